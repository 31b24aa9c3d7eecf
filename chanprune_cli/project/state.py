"""What the last commands in a working directory did (`.chanprune/last.json`), so that

    chanprune score ckpt.pt --criterion sensitivity
    chanprune prune --ratio 0.5

needs no repetition: `score` records the checkpoint, how to load it and its scores; `prune` picks
them up. Paths are stored absolute so the record stays right from subdirectories. The record is a
convenience: failing to write it warns and never fails the command that produced real outputs.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any

from ..support.fsutil import write_text_atomic

STATE_DIR = ".chanprune"
STATE_FILE = "last.json"


class StateWarning(UserWarning):
    pass


def state_path(cwd: str | os.PathLike[str] | None = None) -> Path:
    return Path(cwd or os.getcwd()) / STATE_DIR / STATE_FILE


def read_state(cwd: str | os.PathLike[str] | None = None) -> dict[str, Any]:
    """The recorded state ({} when there is none or it is unreadable: it only supplies defaults)."""
    try:
        data = json.loads(state_path(cwd).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def record(command: str, entry: dict[str, Any], cwd: str | os.PathLike[str] | None = None) -> None:
    """Store `entry` as what `command` did last (other commands' entries stay)."""
    path = state_path(cwd)
    state = read_state(cwd)
    state[command] = entry
    try:
        path.parent.mkdir(exist_ok=True)
        write_text_atomic(path, json.dumps(state, indent=2) + "\n")
    except OSError as exc:
        warnings.warn(f"could not record this run in {path} ({exc.strerror or exc}); "
                      "later commands will need their inputs spelled out", StateWarning, stacklevel=2)


def absolute(path: str | None) -> str | None:
    return None if path is None else os.path.abspath(path)


def same_file(a: str | None, b: str | None) -> bool:
    if a is None or b is None:
        return False
    try:
        return os.path.samefile(a, b)
    except OSError:
        return os.path.abspath(a) == os.path.abspath(b)


def shown(path: str) -> str:
    """A recorded path as the user would type it from here."""
    rel = os.path.relpath(path)
    return path if rel.startswith(os.pardir + os.sep + os.pardir) else rel
