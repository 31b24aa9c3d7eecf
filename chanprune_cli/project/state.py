"""What the last commands in a working directory did (`.chanprune/last.json`), so that

    chanprune score ckpt.pt --criterion sensitivity
    chanprune prune --ratio 0.5

needs no repetition: `score` records the checkpoint, how to load it and its scores; `prune` picks
them up. `prune` and `finetune` record the model they made (`record_model`), so that `finetune`,
`export` and `bench` given no checkpoint follow the newest one (`follow_last_model`). Paths are
stored absolute so the record stays right from subdirectories. The record is a convenience:
failing to write it warns and never fails the command that produced real outputs.
"""

from __future__ import annotations

import json
import os
import sys
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


def record_model(command: str, source: str, out: str) -> None:
    """Note `out`, made by `command` from `source`, as the newest model here. Its original is the
    original of `source` when that is the newest model before it, else `source` itself."""
    previous = read_state().get("model")
    original = (previous.get("original") if isinstance(previous, dict) and same_file(previous.get("path"), source)
                else None) or absolute(source)
    record("model", {"path": absolute(out), "by": command, "source": absolute(source), "original": original})


def follow_last_model(command: str) -> dict[str, str] | None:
    """The newest model made here ({"path", "by", "source", "original"}) for `command` given no
    checkpoint, said in one line on stderr; None when there is none (or it is gone)."""
    last = read_state().get("model")
    if not isinstance(last, dict) or not isinstance(last.get("path"), str) or not os.path.exists(last["path"]):
        return None
    if command == "bench":
        said = f"comparing {shown(last['original'])} with {shown(last['path'])}"
    else:
        said = f"using {shown(last['path'])}"
    print(f"{said}, the model the last 'chanprune {last.get('by')}' here made ({STATE_DIR}/{STATE_FILE})",
          file=sys.stderr, flush=True)
    return last
