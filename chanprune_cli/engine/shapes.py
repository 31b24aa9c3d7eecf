"""Record and restore the channel-shape attributes of a pruned model's modules.

A pruned chanprune checkpoint is reloaded by building the base architecture, restoring these
attributes and the parameter shapes, then loading the weights: no pickle, no graph tracing.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .layer_rules import shape_attr_names


def _json_value(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


_SIZE_ATTRS = "_chanprune_size_attrs"


def mark_size_attrs(module: nn.Module, names: list[str]) -> None:
    """Record attributes other than its rule's that surgery changed on `module` (split sizes)."""
    setattr(module, _SIZE_ATTRS, tuple(dict.fromkeys([*getattr(module, _SIZE_ATTRS, ()), *names])))


def _derived(module: nn.Module, attr: str) -> bool:
    """A property (timm's ConvNormAct.in_channels reads its conv's): follows the children."""
    return isinstance(getattr(type(module), attr, None), property)


def _recorded(module: nn.Module) -> dict[str, Any]:
    values = {a: getattr(module, a, None) for a in shape_attr_names(module) if not _derived(module, a)}
    found = {a: v for a, v in values.items() if isinstance(v, (int, float, tuple))}
    found.update({a: getattr(module, a) for a in getattr(module, _SIZE_ATTRS, ())})  # ints, tuples, lists
    return found


def shape_attrs(model: nn.Module) -> dict[str, dict[str, Any]]:
    """Channel-shape attributes (those the layer rules declare, and split sizes surgery changed) of
    every module that has any, keyed by qualified module name."""
    record: dict[str, dict[str, Any]] = {}
    for name, module in model.named_modules():
        attrs = {a: _json_value(v) for a, v in _recorded(module).items()}
        if attrs:
            record[name] = attrs
    return record


def apply_shape_attrs(model: nn.Module, record: dict[str, dict[str, Any]], tensor_shapes: dict[str, tuple[int, ...]]) -> None:
    """Set recorded attributes and resize parameters/buffers to `tensor_shapes` (values come later).

    Raises KeyError naming the module when `record` names a module the model does not have.
    """
    modules = dict(model.named_modules())
    for name, attrs in record.items():
        if name not in modules:
            raise KeyError(name)
        module = modules[name]
        for attr, value in attrs.items():
            if hasattr(module, attr) and not _derived(module, attr):  # files before 2026-11-27 recorded properties
                setattr(module, attr, tuple(value) if isinstance(value, list) else value)
        declared = shape_attr_names(module)
        extra = [a for a in attrs if a not in declared and hasattr(module, a)]
        if extra:
            mark_size_attrs(module, extra)  # recorded again when this model is pruned and saved
    for module_name, module in modules.items():
        prefix = f"{module_name}." if module_name else ""
        for pname, param in list(module.named_parameters(recurse=False)):
            shape = tensor_shapes.get(prefix + pname)
            if shape is not None and tuple(param.shape) != tuple(shape):
                setattr(module, pname, nn.Parameter(torch.empty(shape, dtype=param.dtype), requires_grad=param.requires_grad))
        for bname, buf in list(module.named_buffers(recurse=False)):
            shape = tensor_shapes.get(prefix + bname)
            if buf is not None and shape is not None and tuple(buf.shape) != tuple(shape):
                module.register_buffer(bname, torch.empty(shape, dtype=buf.dtype))
