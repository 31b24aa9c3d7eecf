"""Mixed precision: which autocast dtype `--amp` means on a device, and the autocast context that
the training step and validation run their forward passes in."""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any

import torch

from ..errors import UserError


def resolve_amp(amp: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for `--amp` on `device` (None: full precision)."""
    if amp == "off":
        return None
    if device.type != "cuda":
        if amp == "auto":
            return None
        raise UserError(f"--amp {amp} needs a CUDA device (mixed precision is for GPUs); use --amp off on {device.type}")
    if amp == "fp16":
        return torch.float16
    if amp == "bf16" or torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float16


def autocast(device: torch.device, dtype: torch.dtype | None) -> Any:
    """Autocast to `dtype` on CUDA; a no-op context in full precision or off CUDA."""
    if dtype is None or device.type != "cuda":
        return nullcontext()
    return torch.autocast("cuda", dtype=dtype)
