"""Whole pickled models (a YOLO `.pt`, any `torch.save(model)`): what was read, and how the pruned
model is written back.

Such a model has no architecture chanprune can rebuild (its classes live in the user's library),
so the result cannot be a chanprune safetensors file. It is written the way it came: the same
container (ultralytics' `{'model': DetectionModel, 'train_args': ..., ...}` dict, or a bare
module) with the pruned module under 'model', in the original floating dtype, plus one
`'chanprune'` entry holding the same JSON metadata a chanprune file records (plans, history,
input shape). What no longer fits the pruned module is dropped (set to None): any other module
(an EMA copy; ultralytics' training checkpoints keep the model there alone, and it is the one
read and pruned) and optimizer states; every other entry is kept as it was (ultralytics'
`train_args` with the task, metrics, version, date). It loads again with `chanprune ...
--trust-pickle`, with `torch.load(path, weights_only=False)`, and with the library that made it
(e.g. `ultralytics.YOLO(path)`, which predicts, validates and exports it with its task).
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..errors import UserError
from ..support.fsutil import atomic_path, check_output

__all__ = ["PICKLE_METADATA_KEY", "PickledOrigin", "check_pickled_output", "float_model", "origin_of", "pickled_metadata",
           "read_pickled_metadata", "save_pickled_model"]

PICKLE_METADATA_KEY = "chanprune"
_MODEL_KEYS = ("model", "net", "module", "ema")


@dataclass
class PickledOrigin:
    """Where a pickled module came from: its container (None: the file was the module itself),
    the container key it sat under, and the floating dtype it was stored in."""

    container: Mapping[str, Any] | None
    key: str | None
    dtype: torch.dtype


def float_model(module: nn.Module) -> tuple[nn.Module, torch.dtype]:
    """The module in float32 for chanprune's work (half-precision files, e.g. ultralytics', run
    slowly or not at all on CPU), and the dtype to write it back in."""
    dtype = next((p.dtype for p in module.parameters() if p.is_floating_point()), torch.float32)
    return (module.float() if dtype != torch.float32 else module), dtype


def origin_of(obj: Any, module: nn.Module, dtype: torch.dtype) -> PickledOrigin:
    if isinstance(obj, Mapping):
        key = next((k for k in _MODEL_KEYS if obj.get(k) is module), None)
        return PickledOrigin({k: v for k, v in obj.items() if k != PICKLE_METADATA_KEY}, key, dtype)
    return PickledOrigin(None, None, dtype)


def read_pickled_metadata(obj: Any) -> dict[str, Any]:
    """The chanprune metadata of a file this module wrote ({} for any other pickle)."""
    raw = obj.get(PICKLE_METADATA_KEY) if isinstance(obj, Mapping) else None
    if raw is None:
        return {}
    try:
        doc = json.loads(raw)
    except (TypeError, ValueError):
        raise UserError("the file's chanprune metadata is not valid JSON; the file is damaged or was edited") from None
    if not isinstance(doc, dict):
        raise UserError("the file's chanprune metadata is malformed; the file is damaged or was edited")
    return doc


def pickled_metadata(input_shape: Any, history: list[dict[str, Any]], plans: list[dict[str, Any]],
                      meta: dict[str, Any], tool_version: str) -> dict[str, Any]:
    return {"format": "chanprune-pickle", "format_version": 1,
            "input_shape": list(input_shape) if input_shape is not None else None,
            "plans": list(plans), "history": list(history), "meta": dict(meta),
            "tool_version": tool_version, "torch_version": torch.__version__}


def _is_optimizer_state(value: Any) -> bool:
    """`optimizer.state_dict()`: shaped by the parameters it was made for."""
    return isinstance(value, Mapping) and "state" in value and "param_groups" in value


def check_pickled_output(path: str) -> None:
    """A whole pickled model is written back as a pickle: never to a .safetensors path."""
    if path.lower().endswith(".safetensors"):
        raise UserError(f"--out {path}: this pickled model has no architecture chanprune can rebuild, so it is saved as "
                        "a pickle in its own container; give --out a .pt path (or pass --arch to write a chanprune file)")


def save_pickled_model(path: str | os.PathLike[str], model: nn.Module, origin: PickledOrigin, *,
                       metadata: dict[str, Any], force: bool = False) -> None:
    """Write `model` into a copy of its original container (see the module docstring)."""
    out = check_output(path, force)
    check_pickled_output(str(out))
    module = copy.deepcopy(model).cpu().eval()
    if origin.dtype != torch.float32:
        module = module.to(origin.dtype)
    text = json.dumps(metadata, default=str)
    if origin.container is None:
        obj: Any = {"model": module, PICKLE_METADATA_KEY: text}
    else:
        obj = dict(origin.container)
        for key, value in obj.items():
            # a second copy (an EMA) of the unpruned model, or optimizer state, would not fit the plans
            if isinstance(value, nn.Module) or _is_optimizer_state(value):
                obj[key] = None
        obj["model" if origin.key in (None, "ema") else origin.key] = module
        obj[PICKLE_METADATA_KEY] = text
    with atomic_path(out) as tmp:
        torch.save(obj, tmp)
