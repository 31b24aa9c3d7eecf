"""`--device auto|cpu|cuda[:N]` → `torch.device`, with one-line errors instead of CUDA tracebacks."""

from __future__ import annotations

import re

import torch

from ..errors import UserError

_CUDA_RE = re.compile(r"^cuda(?::(\d+))?$")


def resolve_device(name: str) -> torch.device:
    """Resolve a `--device` value: "auto" (CUDA when available, else CPU), "cpu", "cuda" or "cuda:N"."""
    text = (name or "").strip().lower()
    if text == "auto":
        return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    if text == "cpu":
        return torch.device("cpu")
    match = _CUDA_RE.match(text)
    if match:
        if not torch.cuda.is_available():
            raise UserError(f"--device {name}: CUDA is not available on this machine; use --device cpu")
        if match.group(1) is not None:
            index = int(match.group(1))
            count = torch.cuda.device_count()
            if index >= count:
                raise UserError(
                    f"--device {name}: this machine has {count} CUDA device(s) (cuda:0..cuda:{count - 1})"
                )
            return torch.device("cuda", index)
        return torch.device("cuda")
    raise UserError(f"unknown --device {name!r}; use auto, cpu, cuda or cuda:N")


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes in bf16 natively (AVX512-BF16 or AMX); elsewhere oneDNN emulates it,
    slower than float32."""
    supported = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    return bool(supported is not None and supported())
