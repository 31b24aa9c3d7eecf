"""The resumable training-state file (`<out>.state.pt`): its format tag and version, capturing and
restoring the RNG streams of a process, reading a state back, and rebuilding the (possibly
pruned) model it holds. The trainer assembles and restores the rest of its contents."""

from __future__ import annotations

import os
import random
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..errors import UserError
from ..models import ArchSpec, build_model

STATE_FORMAT = "chanprune-train-state"
STATE_VERSION = 1


def rng_state() -> dict[str, Any]:
    """This process's torch, Python, NumPy (and initialised CUDA) RNG states, as tensors and
    plain values so that a weights-only load can read them back."""
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": {"name": str(np_state[0]), "keys": torch.from_numpy(np.asarray(np_state[1], dtype=np.int64)),
                  "pos": int(np_state[2]), "has_gauss": int(np_state[3]), "cached": float(np_state[4])},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    """Restore what `rng_state()` captured."""
    torch.set_rng_state(state["torch"])
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def to_cpu(obj: Any) -> Any:
    """`obj` (nested dicts and lists) with every tensor detached and on the CPU."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [to_cpu(v) for v in obj]
    return obj


def load_train_state(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a training-state file (weights-only unpickling; no code runs)."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"no training state at {p} to resume from (it is written during `chanprune finetune` "
                        "and removed when the run completes)")
    try:
        state = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001  (a damaged file fails in many ways; each is one line to the user)
        reason = str(exc).splitlines()[0][:160] if str(exc) else type(exc).__name__
        raise UserError(f"training state {p} is unreadable ({reason})") from None
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise UserError(f"{p} is not a chanprune training state")
    if int(state.get("version", 0)) > STATE_VERSION:
        raise UserError(f"{p} was written by a newer chanprune; upgrade chanprune to resume it")
    return state


def model_from_state(state: Mapping[str, Any], model: nn.Module | None = None) -> nn.Module:
    """Rebuild the model saved in a training state (its current, possibly pruned, shapes); `model`:
    restore into it instead (a whole pickled model, which has no architecture to build)."""
    from ..engine import shapes  # not at the top: see the package docstring

    if model is None:
        spec = ArchSpec.from_json(state["arch"])
        model, name = build_model(spec), str(spec)
    else:
        name = type(model).__name__
    tensors = state["model"]
    shapes.apply_shape_attrs(model, state["module_shapes"], {k: tuple(v.shape) for k, v in tensors.items()})
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    problems = [k for k in missing if not k.endswith("num_batches_tracked")] + list(unexpected)
    if problems:
        raise UserError(f"the training state does not fit {name}: {', '.join(problems[:3])}")
    return model
