"""What a load produces: `LoadedCheckpoint`, and the finiteness check callers run on its weights."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..errors import UserError
from ..models import ArchSpec
from .pickled_model import PickledOrigin

__all__ = ["LoadedCheckpoint", "nonfinite_summary", "nonfinite_tensors", "refuse_nonfinite"]


@dataclass
class LoadedCheckpoint:
    """A model ready to use (eval mode, CPU) plus what its file recorded."""

    model: nn.Module
    arch: ArchSpec | None
    source_format: str  # "state_dict" | "safetensors" | "pickle" | "chanprune"
    input_shape: tuple[int, int, int] | None = None
    history: list[dict[str, Any]] = field(default_factory=list)
    plans: list[dict[str, Any]] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)
    origin: PickledOrigin | None = None  # a whole pickled module: how to write it back (pickled_model.py)


def nonfinite_tensors(model: nn.Module) -> list[str]:
    """Names of floating parameters/buffers that contain NaN or Inf (callers decide what to do)."""
    bad = []
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if tensor is not None and (tensor.is_floating_point() or tensor.is_complex()) and not bool(torch.isfinite(tensor).all()):
            bad.append(name)
    return bad


def nonfinite_summary(model: nn.Module) -> str | None:
    """The first NaN/Inf tensors of `model` as text ("a, b, c (+2 more)"), None when all are finite."""
    bad = nonfinite_tensors(model)
    if not bad:
        return None
    return ", ".join(bad[:3]) + (f" (+{len(bad) - 3} more)" if len(bad) > 3 else "")


def refuse_nonfinite(model: nn.Module, action: str) -> None:
    """UserError naming the NaN/Inf tensors: scores and pruning of a broken model are meaningless."""
    shown = nonfinite_summary(model)
    if shown is not None:
        raise UserError(f"the model has NaN/Inf weights in {shown}; refusing to {action} a broken model "
                        "(use a checkpoint from before training diverged)")
