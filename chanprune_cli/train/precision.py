"""Mixed precision: which autocast dtype `--amp` means on a device, and the autocast context that
the training step and validation run their forward passes in.

On CUDA `auto` picks bf16 where the GPU has it (fp16 with a gradient scaler before Ampere). On the
CPU `auto` stays float32, the portable, bit-reproducible default; `--amp bf16` asks for bf16
autocast, which CPUs with AVX512-BF16 or AMX run natively (a distilled ResNet-56 fine-tune: 1.5–1.8×
faster there, BENCHMARKS.md) and which is refused where it would only be emulated."""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any

import torch

from ..errors import UserError
from ..support.device import cpu_has_native_bf16


def resolve_amp(amp: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for `--amp` on `device` (None: full precision)."""
    if amp == "off":
        return None
    if device.type == "cpu":
        if amp == "auto":
            return None
        if amp == "fp16":
            raise UserError("--amp fp16 needs a CUDA device (CPUs run fp16 slower than float32); "
                            "use --amp bf16 or off on the CPU")
        if not cpu_has_native_bf16():
            raise UserError("--amp bf16: this CPU has no native bf16 arithmetic (AVX512-BF16 or AMX); "
                            "it would be emulated and slower than float32; use --amp off")
        return torch.bfloat16
    if device.type != "cuda":
        if amp == "auto":
            return None
        raise UserError(f"--amp {amp} needs a CUDA device or the CPU; use --amp off on {device.type}")
    if amp == "fp16":
        return torch.float16
    if amp == "bf16" or torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float16


def autocast(device: torch.device, dtype: torch.dtype | None) -> Any:
    """Autocast to `dtype` on CUDA or the CPU; a no-op context in full precision."""
    if dtype is None or device.type not in ("cuda", "cpu"):
        return nullcontext()
    return torch.autocast(device.type, dtype=dtype)
