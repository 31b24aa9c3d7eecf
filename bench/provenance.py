"""Where a benchmark's figures come from: commit, date, command, library versions and machine.

Every bench script puts `provenance()` into its JSON output and `describe()` at the head of the
tables it prints, so a figure copied into BENCHMARKS.md carries what produced it:

    from provenance import describe, provenance  # bench/, the scripts' folder

Library versions are read from the installed distributions (nothing is imported for them); one
that is not installed is recorded as None. The torch thread count and the GPUs are read from torch
when the script has imported it, else the GPUs from `nvidia-smi`.
"""

from __future__ import annotations

import os
import platform
import shlex
import shutil
import subprocess
import sys
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
# Distribution names, as pip spells them.
LIBRARIES = ("torch", "torchvision", "fvcore", "timm", "torch-pruning", "onnxruntime", "ultralytics")
# For a tree without git metadata (a copy on a lent machine): the commit as `git rev-parse HEAD`
# prints it, "-dirty" appended when tracked files differ from it (bench/gpu_check_prepare.sh
# records it, bench/gpu_check.sh passes it on).
COMMIT_ENV = "CHANPRUNE_COMMIT"
DIRTY = "-dirty"


def _git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, check=True,
                          timeout=30).stdout.strip()


def commit_of(repo: Path = REPO) -> dict[str, Any]:
    """The commit checked out in `repo`, whether tracked files differ from it, and where that was read.

    Only `repo`'s own git metadata counts (a copy inside another repository is not at that one's
    commit); without it, `$CHANPRUNE_COMMIT`; else all None."""
    try:
        if Path(_git(repo, "rev-parse", "--show-toplevel")).resolve() == repo.resolve():
            dirty = bool(_git(repo, "status", "--porcelain", "--untracked-files=no"))
            return {"commit": _git(repo, "rev-parse", "HEAD"), "dirty": dirty, "commit_from": "git"}
    except (OSError, subprocess.SubprocessError):
        pass
    recorded = os.environ.get(COMMIT_ENV, "").strip()
    if not recorded:
        return {"commit": None, "dirty": None, "commit_from": None}
    return {"commit": recorded.removesuffix(DIRTY), "dirty": recorded.endswith(DIRTY), "commit_from": COMMIT_ENV}


def library_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {}
    for name in LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def gpu_names() -> list[str]:
    torch = sys.modules.get("torch")
    if torch is not None:
        return [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []
    if shutil.which("nvidia-smi") is None:
        return []
    try:
        listed = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                                text=True, check=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [line.strip() for line in listed.splitlines() if line.strip()]


def provenance(repo: Path = REPO, *, threads: int | None = None) -> dict[str, Any]:
    """What produced a run's figures. `repo`: the tree whose code is measured (default this one);
    `threads`: the intra-op thread count the measurements ran with, where it is not this process's
    torch setting (default: torch's, when torch is imported)."""
    torch = sys.modules.get("torch")
    if threads is None and torch is not None:
        threads = torch.get_num_threads()
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {
        **commit_of(repo),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": shlex.join(["python", *sys.argv]),
        "python": platform.python_version(),
        "libraries": library_versions(),
        "cpu": cpu_model(),
        "cpu_cores": os.cpu_count(),
        "usable_cores": usable,
        "threads": threads,
        "gpus": gpu_names(),
        "platform": platform.platform(),
    }


def describe(prov: dict[str, Any]) -> str:
    """One line for a markdown report or a printed table."""
    if prov["commit"] is None:
        commit = "commit unknown"
    else:
        commit = f"commit {prov['commit'][:10]}" + (" + uncommitted changes" if prov["dirty"] else "")
        if prov["commit_from"] != "git":
            commit += f" (from ${prov['commit_from']})"
    date = datetime.fromisoformat(prov["date"]).strftime("%Y-%m-%d %H:%M UTC")
    libraries = ", ".join(f"{name} {version}" for name, version in prov["libraries"].items() if version is not None)
    cores = f"{prov['cpu_cores']} cores" + (f", {prov['usable_cores']} usable" if prov["usable_cores"] != prov["cpu_cores"] else "")
    threads = "" if prov["threads"] is None else f", {prov['threads']} torch thread" + ("s" if prov["threads"] != 1 else "")
    gpus = ", ".join(prov["gpus"]) or "no GPU"
    return (f"`{prov['command']}` at {commit}, {date}; Python {prov['python']}, {libraries}; "
            f"{prov['cpu']} ({cores}){threads}; {gpus}.")
