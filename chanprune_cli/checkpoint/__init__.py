"""Reading every checkpoint form and writing the chanprune format.

Forms read: bare or wrapped state dicts (torch.save, always `weights_only=True`), safetensors,
whole pickled modules (only with `trust_pickle=True`), and chanprune files (safetensors whose
metadata key `chanprune` holds the architecture, module shapes, plans and history).

This module dispatches on the sniffed form; the pieces live in `sniff` (path checks, form),
`safetensors_file` and `torch_pickle` (safe reading), `unwrap` (weights inside wrappers),
`keys` (fitting keys and shapes to a model), and `chanprune_format` (the format both ways).
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn

from ..errors import UserError
from ..models import ArchSpec, build_model, parse_arch
from .chanprune_format import FORMAT_NAME, FORMAT_VERSION, METADATA_KEY, load_chanprune, save_chanprune, tool_version
from .keys import fit_weights
from .loaded import LoadedCheckpoint, nonfinite_summary, nonfinite_tensors, refuse_nonfinite
from .pickled_model import float_model, origin_of, pickled_metadata, read_pickled_metadata, save_pickled_model
from .safetensors_file import read_safetensors, safetensors_metadata
from .sniff import check_input, not_a_checkpoint, sniff
from .torch_pickle import torch_load
from .unwrap import arch_hint, find_module, find_state_dict

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "LoadedCheckpoint",
    "load_checkpoint",
    "load_state_dict_file",
    "save_chanprune",
    "safetensors_metadata",
    "nonfinite_summary",
    "nonfinite_tensors",
    "output_suffix",
    "refuse_nonfinite",
    "save_model",
    "tool_version",
]

_ARCH_EXAMPLES = "e.g. cifar_resnet56, torchvision:resnet18, mypkg.models:make_net"
_UNRECOGNISED = "is not a PyTorch checkpoint (torch.save) or safetensors file (unrecognised content); pass the model's weights file"


def _resolve_spec(arch: str | ArchSpec, arch_kwargs: str | dict[str, Any] | None) -> ArchSpec:
    if isinstance(arch, ArchSpec):
        return arch if arch_kwargs is None else parse_arch(arch.name, arch_kwargs)
    return parse_arch(arch, arch_kwargs)


def load_checkpoint(
    path: str | os.PathLike[str],
    arch: str | ArchSpec | None = None,
    arch_kwargs: str | dict[str, Any] | None = None,
    trust_pickle: bool = False,
) -> LoadedCheckpoint:
    """Load any supported checkpoint form into an eval-mode CPU model. UserError on every bad input.

    A chanprune file carries its own architecture, so `arch`/`arch_kwargs` are ignored for it, except
    that a recorded `package.module:factory` is only imported when `arch` names the same factory or
    `trust_pickle` is set (building it runs code the file names).
    """
    p = check_input(path)
    kind = sniff(p)
    module: nn.Module | None = None
    hint = ""
    if kind == "safetensors":
        tensors, metadata = read_safetensors(p)
        if METADATA_KEY in metadata:
            return load_chanprune(p, tensors, metadata[METADATA_KEY], arch=arch, trust_code=trust_pickle)
        sd: dict[str, torch.Tensor] | None = tensors
        source = "safetensors"
    elif kind in ("zip", "pickle"):
        obj = torch_load(p, trust_pickle)
        module = find_module(obj)
        sd = None if module is not None else find_state_dict(obj, p)
        source = "pickle" if module is not None else "state_dict"
        hint = arch_hint(obj)
        if module is None and sd is None:
            raise UserError(f"{p} holds no model weights (no state dict of tensors found)")
    else:
        raise UserError(not_a_checkpoint(p, kind) or f"{p} {_UNRECOGNISED}")

    if module is not None and arch is None:
        original = module
        module, dtype = float_model(module.to("cpu"))
        recorded = read_pickled_metadata(obj)
        shape = recorded.get("input_shape")
        return LoadedCheckpoint(model=module.eval(), arch=None, source_format="pickle",
                                input_shape=tuple(shape) if isinstance(shape, list) and 1 <= len(shape) <= 3 else None,
                                history=list(recorded.get("history") or []), plans=list(recorded.get("plans") or []),
                                meta=dict(recorded.get("meta") or {}), origin=origin_of(obj, original, dtype))
    if arch is None:
        raise UserError(f"{p} holds only weights; pass --arch ({_ARCH_EXAMPLES}){hint}")
    spec = _resolve_spec(arch, arch_kwargs)
    model = build_model(spec)
    if module is not None:
        sd = {k: v for k, v in module.state_dict().items() if isinstance(v, torch.Tensor)}
    assert sd is not None
    fit_weights(model, sd, p, spec)
    return LoadedCheckpoint(model=model.to("cpu").eval(), arch=spec, source_format=source)


def save_model(path: str | os.PathLike[str], model: nn.Module, loaded: LoadedCheckpoint, *,
               input_shape: tuple[int, int, int] | list[int] | None, history: list[dict[str, Any]],
               plans: list[dict[str, Any]], meta: dict[str, Any] | None = None, force: bool = False) -> None:
    """Write a command's resulting model: a chanprune safetensors file when its architecture can be
    rebuilt, else the pickled container it was read from (`pickled_model`)."""
    if loaded.arch is not None:
        save_chanprune(path, model, loaded.arch, input_shape=input_shape, history=history, plans=plans, meta=meta,
                       force=force)
    elif loaded.origin is not None:
        save_pickled_model(path, model, loaded.origin, force=force,
                           metadata=pickled_metadata(input_shape, history, plans, dict(meta or {}), tool_version()))
    else:
        raise UserError("this model has no architecture to rebuild it from; pass --arch as well")


def output_suffix(loaded: LoadedCheckpoint) -> str:
    """The file suffix `save_model` writes for this model: .safetensors, or .pt for a pickled one."""
    return ".pt" if loaded.arch is None and loaded.origin is not None else ".safetensors"


def load_state_dict_file(path: str | os.PathLike[str], trust_pickle: bool = False) -> dict[str, torch.Tensor]:
    """The raw tensors of a file (state dict found inside wrappers; key names untouched)."""
    p = check_input(path)
    kind = sniff(p)
    if kind == "safetensors":
        return read_safetensors(p)[0]
    if kind not in ("zip", "pickle"):
        raise UserError(not_a_checkpoint(p, kind) or f"{p} {_UNRECOGNISED}")
    obj = torch_load(p, trust_pickle)
    module = find_module(obj)
    if module is not None:
        return {k: v for k, v in module.state_dict().items() if isinstance(v, torch.Tensor)}
    sd = find_state_dict(obj, p)
    if sd is None:
        raise UserError(f"{p} holds no tensors (no state dict found)")
    return sd
