"""The op-rule table's default entries for ops that act on each element or each channel:
elementwise and binary ops, per-channel spatial ops (pooling, interpolation, RoI pooling),
reductions, softmaxes, ops that only read a shape, and rows written into a fresh tensor.
(Ops replayed on the labels themselves are in `structural_ops`.)"""

from __future__ import annotations

import operator
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torchvision.ops import stochastic_depth

from .labels import broadcast_vec, id_values, varying_axes
from .op_rules import OpCall, register_op_rule
from .recording import setitem

_ELEMENTWISE = (
    F.relu, F.relu6, F.leaky_relu, F.elu, F.selu, F.celu, F.gelu, F.silu, F.mish, F.hardswish,
    F.hardsigmoid, F.hardtanh, F.sigmoid, F.tanh, F.softplus, F.dropout, F.dropout1d, F.dropout2d,
    F.dropout3d, F.alpha_dropout, torch.relu, torch.sigmoid, torch.tanh, torch.clamp, torch.clip,
    torch.exp, torch.abs, torch.neg, torch.sqrt, torch.rsqrt, operator.neg,
    stochastic_depth,  # scales whole samples: every channel alike
    "relu", "relu_", "sigmoid", "sigmoid_", "tanh", "tanh_", "clamp", "clamp_", "clip", "clip_",
    "contiguous", "float", "double", "half", "bfloat16", "detach", "clone",
    "exp", "abs", "neg", "sqrt", "rsqrt", "hardtanh_",
)
_BINARY = (
    operator.add, operator.iadd, operator.sub, operator.isub, operator.mul, operator.imul,
    operator.truediv, operator.itruediv, torch.add, torch.sub, torch.mul, torch.div,
    torch.maximum, torch.minimum,
    "add", "add_", "sub", "sub_", "mul", "mul_", "div", "div_", "maximum", "minimum",
)
_PER_CHANNEL_SPATIAL = (
    F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d, F.adaptive_max_pool1d,
    F.adaptive_max_pool2d, F.adaptive_max_pool3d, F.avg_pool1d, F.avg_pool2d, F.avg_pool3d,
    F.max_pool1d, F.max_pool2d, F.max_pool3d, F.interpolate,
)
_REDUCTIONS = ("mean", "sum", "amax", "amin", torch.mean, torch.sum, torch.amax, torch.amin)
# Normalise along one axis: channels pass unless that axis is the channel axis.
_SOFTMAXES = (F.softmax, F.log_softmax, torch.softmax, torch.log_softmax, "softmax", "log_softmax")
# Casts: a tensor argument (`x.type_as(y)`, `x.to(y)`) lends only its dtype and device.
_CASTS = ("to", "type_as")
# Ops whose tensor inputs only contribute their shape (or nothing channel-wise).
_SHAPE_ONLY = ("size", "dim", "numel", getattr, torch.numel, "new_zeros", "new_ones", "new_empty", "new_full",
               "new_tensor",
               torch.zeros_like, torch.ones_like, torch.empty_like, torch._assert)
# What a module's parameter or buffer may go through before it meets the channels.
_VIEWS_OF_A_TENSOR = {"view", "reshape", "unsqueeze", "expand", "expand_as", "to", "type_as", "contiguous", "float",
                      "double", "half", "bfloat16", torch.reshape, torch.unsqueeze}


def _roi_ops() -> list[Any]:
    """torchvision's RoI pooling (detectors' second stage): output channel c of every box is pooled
    from input channel c alone, whatever the boxes, so it passes channels like a pooling layer.
    (The position-sensitive variants mix channels and are not here.)"""
    import torchvision.ops

    ops: list[Any] = [torchvision.ops.roi_align, torchvision.ops.roi_pool]
    for name in ("roi_align", "roi_pool"):
        packet = getattr(torch.ops.torchvision, name, None)
        if packet is not None:
            ops += [packet, packet.default]
    return ops


def shape_only(call: OpCall) -> bool:
    """Reads only the shape: the output carries no channels."""
    call.set_output(None)
    return True


def elementwise(call: OpCall) -> bool:
    """Acts on every element alike: ids pass through (or meet, when it reads other tensors too)."""
    if len(call.tracked) != 1 or call.shape is None:
        return False
    first = call.label(call.node.args[0])
    if first is not None and tuple(first.shape) == call.shape and len(call.inputs) == 1:
        call.set_output(first)
    else:
        combine(call, call.shape)
    return True


def cast(call: OpCall) -> bool:
    """`x.to(...)`, `x.type_as(y)`: x's channels pass (y's carry nothing into the output:
    `torch.arange(w).type_as(feats)` builds anchors, not features)."""
    x = call.label(call.node.args[0])
    call.set_output(x if x is not None and call.shape is not None and tuple(x.shape) == call.shape else None)
    return True


def binary(call: OpCall) -> bool:
    """add, mul, ...: ids meeting at one position stand or fall together."""
    if call.shape is None:
        call.pin_inputs(f"{call.op} ({call.node.name}) gives a non-tensor")
        call.set_output(None)
    else:
        combine(call, call.shape)
    return True


def per_channel_spatial(call: OpCall) -> bool:
    """Acts on each channel's spatial map on its own (channel axis 1): the channels pass."""
    if call.shape is None:
        return False
    x = call.label(call.node.args[0])
    if x is None:
        return False
    vec = call.channel_vector(x, 1)
    call.set_output(call.broadcast(vec, 1) if bool((vec >= 0).any()) else None)
    return True


def softmax(call: OpCall) -> bool:
    """Normalises along `dim`: pins the channels when that is the channel axis."""
    x = call.label(call.node.args[0])
    if x is None:
        return False
    dim = call.argument(1, "dim")
    if not isinstance(dim, int) or dim % x.dim() in varying_axes(x):
        call.pin_inputs(f"{call.op} over channels ({call.node.name})")
        call.set_output(None)
    else:
        call.set_output(x)
    return True


def reduction(call: OpCall) -> bool:
    """mean/sum/amax/amin over axes the channels do not vary along: the channels pass."""
    x = call.label(call.node.args[0])
    dims = call.argument(1, "dim")
    keepdim = bool(call.argument(2, "keepdim", False))
    if x is None or dims is None or call.shape is None:
        call.pin_inputs(f"reduction over all axes ({call.node.name})")
        call.set_output(None)
        return True
    dims_list = [d % x.dim() for d in (dims if isinstance(dims, (tuple, list)) else [dims])]
    if any(d in varying_axes(x) for d in dims_list):
        call.pin_inputs(f"reduction over channels ({call.node.name})")
        call.set_output(None)
        return True
    out = x
    for d in sorted(dims_list, reverse=True):
        out = out.narrow(d, 0, 1)
        if not keepdim:
            out = out.squeeze(d)
    call.set_output(out.expand(call.shape) if tuple(out.shape) != call.shape else out)
    return True


def rows_written(call: OpCall) -> bool:
    """`dest[rows] = value` (torchvision's multi-scale RoI pooling fills a zeros tensor level by
    level): when only the leading axis is indexed, channel c of `dest` holds channel c of
    `value`, of earlier writes, or zeros. A fresh `dest` takes `value`'s channels from here on;
    one written before has its channels unioned with `value`'s, as an addition would. Anything
    else is not followed (False)."""
    dest, index, value = call.node.args[:3]
    shape = call.shape_of(dest) if isinstance(dest, fx.Node) else None
    lab, known = call.label(value), call.label(dest) if isinstance(dest, fx.Node) else None
    leading_only = not isinstance(index, tuple) or all(i == slice(None) for i in index[1:])
    if shape is None or len(shape) < 2 or lab is None or lab.dim() < 2 or lab.shape[1] != shape[1] or not leading_only:
        return False
    vec = call.channel_vector(lab, 1, "setitem")
    if not bool((vec >= 0).all()):
        return False
    if isinstance(known, torch.Tensor) and bool((id_values(known) >= 0).any()):
        earlier = call.channel_vector(known, 1, "setitem")
        if not bool((earlier >= 0).all()):
            return False
        for a, b in zip(earlier.tolist(), vec.tolist()):
            call.union(a, b)
        return True
    assert isinstance(dest, fx.Node)
    call.relabel(dest, broadcast_vec(vec, 1, shape))
    return True


def combine(call: OpCall, shape: tuple[int, ...]) -> None:
    """An elementwise op of several operands: ids meeting at one position are unioned. A tracked
    channel meeting a fixed per-channel tensor is pinned (that tensor cannot be sliced), unless the
    tensor is a module's parameter or buffer varying along the channel axis only (a layer scale, a
    per-channel bias): then its entries are slots of the channels they meet."""
    node = call.node
    operands = [(a, lab) for a in (*node.args, *node.kwargs.values()) if (lab := call.label(a)) is not None]
    labs = [lab for _, lab in operands]
    full = [t.expand(shape) if t.dim() == len(shape) else t.reshape((1,) * (len(shape) - t.dim()) + tuple(t.shape)).expand(shape)
            for t in labs]
    # Perf: work on the axes some operand really has in memory (labels are mostly broadcast
    # vectors) and broadcast the result back; the where/compare calls materialised full-size
    # maps (convnext, efficientnet). Same ids at every position.
    for axis in range(len(shape)):
        if shape[axis] > 1 and all(f.stride(axis) == 0 for f in full):
            full = [f.narrow(axis, 0, 1) for f in full]
    tracked = [f for f in full if bool((f >= 0).any())]
    base = tracked[0]
    for other, (arg, orig) in zip(full, operands):
        if other is base:
            continue
        call.union_pairs(base, other)
        # Elements where a tracked id meets an untracked value that differs per channel.
        if bool(((other < 0) & (base >= 0)).any()) or bool(((base < 0) & (other >= 0)).any()):
            aligned = (1,) * (len(shape) - orig.dim()) + tuple(orig.shape)
            axes = set(varying_axes(base)) | set(varying_axes(other))
            if any(aligned[a] > 1 for a in axes) and not _tensor_slots(call, arg, aligned, base):
                mixed = torch.where(base >= 0, base, other)
                bad = mixed[((other < 0) & (base >= 0)) | ((base < 0) & (other >= 0))]
                call.cannot_follow(bad, f"{node.name} combines channels with a fixed per-channel tensor")
    merged = base
    for other in tracked[1:]:
        merged = torch.where(merged >= 0, merged, other)
    call.set_output(merged.expand(shape))


def _tensor_slots(call: OpCall, arg: Any, aligned: tuple[int, ...], tracked: torch.Tensor) -> bool:
    """Link the entries of a module's parameter/buffer (reached from `arg` through reshapes)
    to the channels they meet, when both vary along one and the same axis only; slot kind
    "tensor:ATTR:DIM" on the owning module (surgery slices ATTR along DIM)."""
    origin = _tensor_origin(call, arg)
    varying = varying_axes(tracked)
    if origin is None or len(varying) != 1:
        return False
    owner, attr, tensor = origin
    axis = varying[0]
    dims = [d for d, n in enumerate(tensor.shape) if n > 1]
    if [a for a, n in enumerate(aligned) if n > 1] != [axis] or len(dims) != 1 or tensor.shape[dims[0]] != aligned[axis]:
        return False
    index: list[Any] = [0] * tracked.dim()
    index[axis] = slice(None)
    for c, i in enumerate(tracked[tuple(index)].tolist()):
        call.link_slot((owner, f"tensor:{attr}:{dims[0]}", c), i)
    return True


def _tensor_origin(call: OpCall, arg: Any) -> tuple[str, str, torch.Tensor] | None:
    """(owning module, attribute, tensor) when `arg` is a module's parameter or buffer, possibly
    reshaped or cast; None otherwise."""
    while isinstance(arg, fx.Node) and arg.op in ("call_method", "call_function") and arg.target in _VIEWS_OF_A_TENSOR:
        arg = arg.args[0] if arg.args else None
    if not isinstance(arg, fx.Node) or arg.op != "get_attr":
        return None
    owner, _, attr = str(arg.target).rpartition(".")
    module = call.modules.get(owner)
    # registered parameters and buffers only: tensors a forward creates are constants of the trace
    tensor = module._parameters.get(attr, module._buffers.get(attr)) if module is not None else None
    return (owner, attr, tensor) if isinstance(tensor, torch.Tensor) else None


def register_builtin_ops() -> None:
    for ops, rule in ((_SHAPE_ONLY, shape_only), (_ELEMENTWISE, elementwise), (_CASTS, cast), (_BINARY, binary),
                      ((*_PER_CHANNEL_SPATIAL, *_roi_ops()), per_channel_spatial), (_REDUCTIONS, reduction),
                      (_SOFTMAXES, softmax)):
        for op in ops:
            register_op_rule(op, rule)
    register_op_rule(setitem, rows_written)  # recorded `dest[index] = value`


register_builtin_ops()
