"""`chanprune bench` on a machine whose load moves the models unequally: the rounds' speed-ups
spread too wide to rely on are said on a warning line and in the JSON, and a speed-up gate whose
limit lies within that spread is marked noisy instead of passing or failing silently.

The models' runs are replaced by sleeps, so the timings are what each test makes them."""

from __future__ import annotations

import itertools
import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from typer.testing import CliRunner

from chanprune_cli.cli import app
from chanprune_cli.deploy import runtimes
from chanprune_cli.models import build_model, parse_arch

ARCH = ("--arch", "digits_cnn")
FAST = ("--threads", "1", "--warmup", "1", "--repeats", "6", "--batch-sizes", "1")
runner = CliRunner()


def cli(*args: Any) -> Any:
    return runner.invoke(app, [str(a) for a in args], env={"CHANPRUNE_DEBUG": None})


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("noise")
    torch.manual_seed(0)
    torch.save({"state_dict": build_model(parse_arch("digits_cnn")).state_dict(), "arch": "digits_cnn"}, d / "ref.pt")
    pruned = d / "pruned.safetensors"
    assert cli("prune", d / "ref.pt", *ARCH, "--ratio", "0.5", "--out", pruned).exit_code == 0
    return d / "ref.pt", pruned


def _timed_as(monkeypatch: pytest.MonkeyPatch, reference_ms: float, pruned_ms: Iterator[float]) -> None:
    """Every run of the reference sleeps `reference_ms`, the pruned model's runs the next of `pruned_ms`."""
    full = sum(p.numel() for p in build_model(parse_arch("digits_cnn")).parameters())

    def prepare(self: runtimes.LatencyTarget, model: torch.nn.Module, shape: Any) -> Callable[[int], Any]:
        is_reference = sum(p.numel() for p in model.parameters()) == full
        return lambda batch: lambda: time.sleep((reference_ms if is_reference else next(pruned_ms)) / 1000)

    monkeypatch.setattr(runtimes.LatencyTarget, "prepare", prepare)


def test_steady_timings_say_nothing(models: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _timed_as(monkeypatch, 40.0, itertools.repeat(20.0))
    out = tmp_path / "b.json"
    result = cli("bench", *models, *ARCH, *FAST, "--min-speedup", "1.5", "--json", out)
    assert result.exit_code == 0, result.stderr
    doc = json.loads(out.read_text())
    vs = doc["models"][1]["vs_reference"]
    lo, hi = vs["speedup_range"]["1"]
    assert 1.5 < lo <= vs["speedup"]["1"] <= hi < 2.5 and vs["noisy"] == []
    assert doc["warnings"] == [] and doc["gates"][0]["noisy"] is None
    assert "noisy" not in result.stdout + result.stderr


def test_noisy_timings_are_said_and_the_gate_is_marked(models: tuple[Path, Path], tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """Rounds alternate between the pruned model 4x and 1x as fast: the median says one thing, a
    re-run may say the other."""
    _timed_as(monkeypatch, 40.0, itertools.cycle([10.0, 40.0]))
    out = tmp_path / "b.json"
    result = cli("bench", *models, *ARCH, *FAST, "--min-speedup", "2", "--json", out)
    doc = json.loads(out.read_text())
    vs = doc["models"][1]["vs_reference"]
    lo, hi = vs["speedup_range"]["1"]
    assert lo < 1.5 and hi > 3 and vs["noisy"] == [1]
    [line] = doc["warnings"]
    assert line.startswith(f"{models[1]} at batch 1: timings too noisy to rely on its ")
    assert "the rounds' speed-ups range" in line and line.endswith("with fewer --threads or a longer --max-time")
    assert "warning: " + line in " ".join(result.stderr.split())
    [gate] = doc["gates"]
    assert gate["noisy"] == pytest.approx([lo, hi])
    said = " ".join((result.stdout + result.stderr).split())
    assert "(noisy: the rounds' values range" in said and ("a re-run may fail" in said or "a re-run may pass" in said)
    assert result.exit_code == (0 if gate["passed"] else 3), result.stderr

    # the latency-ratio gate: the spread as latency ratios (model / reference)
    ratio = cli("bench", *models, *ARCH, *FAST, "--max-latency-ratio", "0.5", "--json", tmp_path / "r.json")
    assert ratio.exit_code in (0, 3), ratio.stderr
    [gate] = json.loads((tmp_path / "r.json").read_text())["gates"]
    lo, hi = gate["noisy"]
    assert gate["name"] == "max-latency-ratio" and lo < 0.5 < hi and hi > 1.5 * lo
    assert "(noisy: the rounds' values range" in " ".join((ratio.stdout + ratio.stderr).split())
