"""bench/provenance.py: what every bench script records beside its figures (commit, date, command,
library versions, machine)."""

from __future__ import annotations

import importlib
import os
import subprocess
from importlib import metadata
from pathlib import Path
from types import ModuleType

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def prov(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    monkeypatch.syspath_prepend(str(REPO / "bench"))  # the scripts import it from their folder
    monkeypatch.delenv("CHANPRUNE_COMMIT", raising=False)
    return importlib.import_module("provenance")


def _git(*args: str, cwd: Path = REPO) -> str:
    return subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, check=True).stdout.strip()


def test_this_tree_its_commit_libraries_and_machine(prov: ModuleType) -> None:
    p = prov.provenance()
    assert p["commit"] == _git("rev-parse", "HEAD") and p["commit_from"] == "git"
    assert p["dirty"] is bool(_git("status", "--porcelain", "--untracked-files=no"))
    assert set(p["libraries"]) == set(prov.LIBRARIES)
    assert p["libraries"]["torch"] == metadata.version("torch")
    assert p["cpu_cores"] == os.cpu_count() and p["threads"] == torch.get_num_threads()
    assert prov.provenance(threads=3)["threads"] == 3
    expected_gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []
    assert p["gpus"] == expected_gpus


def test_a_copy_without_its_own_git_metadata_takes_the_recorded_commit(prov: ModuleType, tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    outer = tmp_path / "outer"
    copy = outer / "copy"
    copy.mkdir(parents=True)
    _git("init", "-q", cwd=outer)  # the copy lies inside another repository: that one's commit is not its own
    assert prov.commit_of(copy) == {"commit": None, "dirty": None, "commit_from": None}
    monkeypatch.setenv("CHANPRUNE_COMMIT", "0123abc-dirty")
    assert prov.commit_of(copy) == {"commit": "0123abc", "dirty": True, "commit_from": "CHANPRUNE_COMMIT"}
    monkeypatch.setenv("CHANPRUNE_COMMIT", "0123abc")
    assert prov.provenance(copy)["dirty"] is False


def test_the_line_a_report_carries(prov: ModuleType) -> None:
    p = {**prov.provenance(), "commit": "0123456789abcdef", "dirty": True, "commit_from": "git", "threads": 1,
         "date": "2026-01-02T03:04:05+00:00", "command": "python bench/x.py --fast", "cpu_cores": 4, "usable_cores": 2,
         "libraries": {"torch": "2.0", "timm": None}, "gpus": []}
    line = prov.describe(p)
    assert line.startswith("`python bench/x.py --fast` at commit 0123456789 + uncommitted changes, 2026-01-02 03:04 UTC; ")
    assert "torch 2.0;" in line and "timm" not in line and "(4 cores, 2 usable), 1 torch thread; no GPU." in line
    unknown = prov.describe({**p, "commit": None, "dirty": None, "commit_from": None})
    assert "at commit unknown," in unknown
    recorded = prov.describe({**p, "dirty": False, "commit_from": "CHANPRUNE_COMMIT", "gpus": ["NVIDIA H100"]})
    assert "at commit 0123456789 (from $CHANPRUNE_COMMIT)," in recorded and recorded.endswith("; NVIDIA H100.")
