"""Finding the weights inside whatever a torch.save file held: a module, a bare state dict, or a
state dict nested under a training script's wrapper keys."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import UserError
from .keys import module_versions, with_versions

__all__ = ["find_module", "find_state_dict", "arch_hint"]

# Keys under which training scripts commonly nest the model's state dict, in order of preference.
_WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "net", "module")


def _is_state_dict(obj: Any) -> bool:
    """A mapping of str → tensors (non-tensor extras allowed), not a wrapper around one."""
    if not isinstance(obj, Mapping) or not obj:
        return False
    if not all(isinstance(k, str) for k in obj):
        return False
    if any(isinstance(v, Mapping) and _holds_tensors(v) for v in obj.values()):
        return False
    return any(isinstance(v, torch.Tensor) for v in obj.values())


def _holds_tensors(obj: Mapping[Any, Any]) -> bool:
    return any(isinstance(v, torch.Tensor) or (isinstance(v, Mapping) and _holds_tensors(v)) for v in obj.values())


def find_module(obj: Any) -> nn.Module | None:
    """The pickled module itself, or one stored under a 'model' / 'net' / 'module' key; in
    ultralytics' training checkpoints (a 'train_args' entry), the 'ema' module first, as
    ultralytics itself loads them (its last.pt holds the model there alone)."""
    if isinstance(obj, nn.Module):
        return obj
    if isinstance(obj, Mapping):
        keys = ("ema", "model", "net", "module") if "train_args" in obj else ("model", "net", "module")
        for key in keys:
            if isinstance(obj.get(key), nn.Module):
                return obj[key]
    return None


def find_state_dict(obj: Any, p: Path, depth: int = 0) -> dict[str, torch.Tensor] | None:
    """Detect the state dict: known wrapper keys first, then the object itself, then a lone nested one."""
    if not isinstance(obj, Mapping) or depth > 4:
        return None
    for key in _WRAPPER_KEYS:
        if key in obj:
            found = find_state_dict(obj[key], p, depth + 1)
            if found is not None:
                return found
    if _is_state_dict(obj):
        return with_versions({k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}, module_versions(obj))
    candidates = {}
    for key, value in obj.items():
        found = find_state_dict(value, p, depth + 1) if isinstance(value, Mapping) else None
        if found is not None:
            candidates[str(key)] = found
    if len(candidates) == 1:
        return next(iter(candidates.values()))
    if len(candidates) > 1:
        # Several sets of weights (e.g. model and EMA) and no standard key: refuse to guess.
        raise UserError(
            f"{p} holds several sets of weights (under {', '.join(sorted(candidates)[:5])}); "
            f"save the one you want as a plain state dict or under 'state_dict'"
        )
    return None


def arch_hint(obj: Any) -> str:
    """A message suffix naming the architecture a wrapper records under 'arch', or ''."""
    if isinstance(obj, Mapping) and isinstance(obj.get("arch"), str) and obj["arch"].strip():
        return f"; the file mentions arch {obj['arch'].strip()!r}"
    return ""
