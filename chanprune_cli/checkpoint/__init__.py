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
from .safetensors_file import read_safetensors, safetensors_metadata
from .sniff import check_input, sniff
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
    "refuse_nonfinite",
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
        raise UserError(f"{p} {_UNRECOGNISED}")

    if module is not None and arch is None:
        module = module.to("cpu").eval()
        return LoadedCheckpoint(model=module, arch=None, source_format="pickle")
    if arch is None:
        raise UserError(f"{p} holds only weights; pass --arch ({_ARCH_EXAMPLES}){hint}")
    spec = _resolve_spec(arch, arch_kwargs)
    model = build_model(spec)
    if module is not None:
        sd = {k: v for k, v in module.state_dict().items() if isinstance(v, torch.Tensor)}
    assert sd is not None
    fit_weights(model, sd, p, spec)
    return LoadedCheckpoint(model=model.to("cpu").eval(), arch=spec, source_format=source)


def load_state_dict_file(path: str | os.PathLike[str], trust_pickle: bool = False) -> dict[str, torch.Tensor]:
    """The raw tensors of a file (state dict found inside wrappers; key names untouched)."""
    p = check_input(path)
    kind = sniff(p)
    if kind == "safetensors":
        return read_safetensors(p)[0]
    if kind not in ("zip", "pickle"):
        raise UserError(f"{p} {_UNRECOGNISED}")
    obj = torch_load(p, trust_pickle)
    module = find_module(obj)
    if module is not None:
        return {k: v for k, v in module.state_dict().items() if isinstance(v, torch.Tensor)}
    sd = find_state_dict(obj, p)
    if sd is None:
        raise UserError(f"{p} holds no tensors (no state dict found)")
    return sd
