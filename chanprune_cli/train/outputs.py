"""Where a fine-tuning run writes (`--out` and the files beside it) and what the chanprune files it
writes record besides the weights."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class OutputPaths:
    """`--out F.safetensors` → F.best.safetensors, F.last.safetensors, F.state.pt beside it."""

    out: Path
    best: Path
    last: Path
    state: Path

    @classmethod
    def for_out(cls, out: str | os.PathLike[str]) -> OutputPaths:
        p = Path(out)
        suffix = p.suffix if p.suffix else ".safetensors"
        stem = p.name[: -len(p.suffix)] if p.suffix else p.name
        return cls(out=p, best=p.with_name(f"{stem}.best{suffix}"), last=p.with_name(f"{stem}.last{suffix}"),
                   state=p.with_name(f"{stem}.state.pt"))


@dataclass
class CheckpointInfo:
    """What a model file written by the trainer records besides the weights."""

    arch: Any  # ArchSpec (None: a whole pickled model, written back into its container)
    input_shape: tuple[int, int, int]
    history: list[dict[str, Any]] = field(default_factory=list)  # the input checkpoint's history
    plans: list[dict[str, Any]] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)
    entry: dict[str, Any] = field(default_factory=dict)  # this run's history entry (static part)
    origin: Any = None  # checkpoint.PickledOrigin of a whole pickled model (checkpoint.save_model)
