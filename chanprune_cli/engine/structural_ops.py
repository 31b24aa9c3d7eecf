"""The op-rule table's default entries for ops replayed on the label tensors themselves.

Ops that move elements without mixing channels (cat, stack, permute, view, reshape, split,
chunk, slicing, pad, ...) are run on the labels (`OpCall.replay`), so the ids go where the op puts
the elements. What the replay alone cannot see is checked here: ids an op drops (slicing,
indexing), sizes that go stale when a channel is removed (a reshape or split to literal sizes, an
expand to a fixed count), and sizes read from another tensor. Those channels are pinned, unless
the sizes are attributes of the module running the op, which surgery can rewrite (`split:` slots).
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from .labels import axis_vector, compact, pad_labels, unique_ids, varying_axes
from .layer_rules import UNTRACKED
from .op_rules import OpCall, register_op_rule

_SIZE_ARITHMETIC = {operator.add, operator.sub, operator.mul, operator.floordiv, operator.truediv, operator.mod,
                    operator.neg, int, math.prod}
_STRUCTURAL = (
    torch.flatten, torch.permute, torch.transpose, torch.cat, torch.concat, torch.concatenate, torch.stack,
    torch.squeeze, torch.unsqueeze, torch.narrow, torch.movedim,
    "flatten", "permute", "transpose", "squeeze", "unsqueeze", "narrow", "movedim", "repeat", "t",
)


def _replay(call: OpCall, inputs: list[torch.Tensor] | None = None, fn: Callable[..., Any] | None = None,
            args: Any = None, kwargs: Any = None) -> tuple[Any, torch.Tensor | None]:
    """The op replayed on the labels and given its result as output: (result, the ids of a tensor
    result, checked against `inputs` (default: every tensor input) by `check_selection`; None
    for other results)."""
    result = call.replay(fn, args, kwargs)
    ids = None
    if isinstance(result, torch.Tensor):
        ids = check_selection(call, call.inputs if inputs is None else inputs, [result])
    _set_result(call, result)
    return result, ids


def _is_pieces(result: Any) -> bool:
    return isinstance(result, (tuple, list)) and all(isinstance(r, torch.Tensor) for r in result)


def _set_result(call: OpCall, result: Any) -> None:
    """A tensor result is the output's label; a tuple or list of tensors, one label per piece."""
    call.set_output(result if isinstance(result, torch.Tensor) else tuple(result) if _is_pieces(result) else None)


def structural(call: OpCall) -> bool:
    """Replayed on the labels: the ids go where the op puts the elements."""
    _replay(call)
    return True


def getitem(call: OpCall) -> bool:
    """Indexing and slicing: a channel slice bounded by the running module's attributes is
    followed (`split:` slots); any other that drops channels pins them."""
    result = call.replay()
    if isinstance(result, torch.Tensor) and not _sliced_by_attributes(call):
        check_selection(call, call.inputs, [result])
    _set_result(call, result)
    return True


def pad(call: OpCall) -> bool:
    """F.pad with zeros: new positions on the channel axis are untracked channels (spatial
    padding repeats the ids: `labels.pad_labels`); other modes are not followed."""
    args, kwargs = call.label_args()
    if kwargs.get("mode", args[2] if len(args) > 2 else "constant") != "constant":
        call.pin_inputs(f"non-constant pad ({call.node.name})")
        call.set_output(None)
    else:
        _replay(call, fn=pad_labels, args=args[:2], kwargs={"mode": "constant", "value": UNTRACKED})
    return True


def expand(call: OpCall) -> bool:
    """`x.expand(...)`: a literal channel count goes stale once a channel is removed."""
    result, _ = _replay(call)
    if isinstance(result, torch.Tensor):
        _check_fixed_expand(call, result)
    return True


def _first_input(call: OpCall) -> list[torch.Tensor]:
    """The tensor whose elements the op moves. (`s.expand_as(x)`: `x` only lends its shape;
    counting its ids as inputs would make every such expand look like a channel selection, as in
    SE blocks written that way.)"""
    return [t for t in (call.label(call.node.args[0]),) if t is not None]


def expand_as(call: OpCall) -> bool:
    _replay(call, _first_input(call))
    return True


def reshape(call: OpCall) -> bool:
    """view/reshape (and view_as, reshape_as, unflatten): splitting the channel axis into literal
    sizes pins the channels (or unions the ids along those axes, see `resolve_split_axes`); a
    size read from another tensor's channel axis ties the two tensors' channels."""
    target = call.target
    result, ids = _replay(call, _first_input(call) if target in ("view_as", "reshape_as") else None)
    if isinstance(result, torch.Tensor):
        resolve_split_axes(call, result, literal_sizes=False)
        if target in ("view", "reshape", torch.reshape):
            _borrowed_sizes(call, result, ids)
    return True


def pieces(call: OpCall) -> bool:
    """chunk/split along the channel axis: every piece must lose the same positions."""
    result, _ = _replay(call)
    if _is_pieces(result):
        _split_pieces(call, call.inputs, list(result))
    return True


def unbind(call: OpCall) -> bool:
    """Unbinding the channel axis makes every channel a tensor of its own: pinned."""
    result, _ = _replay(call)
    dim = call.argument(1, "dim", 0) if _is_pieces(result) else None
    x = call.inputs[0] if call.inputs else None
    if x is not None and isinstance(dim, int) and dim % x.dim() in varying_axes(x):
        call.cannot_follow(x[x >= 0], f"channels unbound at {call.node.name}")
    return True


def replay_module(call: OpCall, fn: Callable[..., Any], literal_sizes: bool, module: nn.Module) -> None:
    """A module replayed on the labels (`ModuleCall.structural`: nn.Flatten, nn.Unflatten).
    `literal_sizes`: the sizes of every axis the module splits the channels into are fixed."""
    result, _ = _replay(call, fn=fn)
    if isinstance(result, torch.Tensor) and literal_sizes:
        resolve_split_axes(call, result, literal_sizes, module)


# ------------------------------------------------------------------------------------------------
# Checks of a replayed op


def check_selection(call: OpCall, inputs: list[torch.Tensor], outputs: list[torch.Tensor]) -> torch.Tensor:
    """A structural op that drops channel ids (slicing, indexing) pins the channels involved.
    Returns the outputs' ids."""
    # Perf: fast id sets on compacted labels (was cat + Tensor.unique on materialised maps).
    before = unique_ids(torch.cat([compact(t).reshape(-1) for t in inputs])) if inputs else torch.empty(0, dtype=torch.long)
    after = unique_ids(torch.cat([compact(t).reshape(-1) for t in outputs]))
    if before.numel() != after.numel():
        call.cannot_follow(before, f"channel selection at {call.node.name}")
    return after


def _check_fixed_expand(call: OpCall, result: torch.Tensor) -> None:
    """`x.expand(-1, 64, h, w)` keeps a literal channel count that goes stale when a channel
    is removed (the pruned model would crash): pin the channels along such an axis."""
    sizes = list(call.node.args[1:])
    if len(sizes) == 1 and isinstance(sizes[0], (tuple, list)):
        sizes = list(sizes[0])
    fixed = [a for a in varying_axes(result) if a != 0 and a < len(sizes)
             and isinstance(sizes[a], int) and sizes[a] != -1]
    if fixed:
        call.cannot_follow(result[result >= 0], f"expand to a fixed channel count at {call.node.name}")


def resolve_split_axes(call: OpCall, result: torch.Tensor, literal_sizes: bool,
                       module: nn.Module | None = None) -> None:
    """A reshape that splits the channel axis into several (channel shuffle, heads): the axes
    given as literal sizes must keep their size, so ids along them fall together. `module`: the
    module replayed (`replay_module`), whose nn.Unflatten sizes are the literal ones."""
    varying = [a for a in varying_axes(result) if a != 0]
    if not varying:
        return
    node = call.node
    shape_args = list(node.args[1:])
    if len(shape_args) == 1 and isinstance(shape_args[0], (tuple, list)):
        shape_args = list(shape_args[0])
    unflatten: tuple[Any, Any] | None = None
    if node.target in ("unflatten", torch.unflatten) and len(node.args) >= 3:
        unflatten = (call.value(node.args[1]), node.args[2])
    elif literal_sizes and isinstance(module, nn.Unflatten):
        unflatten = (module.dim, module.unflattened_size)
    if unflatten is not None:
        # A negative dim counts from the end of the *input*, and only the unflattened sizes
        # are literal (nn.Unflatten's other axes are not).
        start, sizes = unflatten
        shape_args = [None] * (start % (result.dim() - len(sizes) + 1)) + list(sizes)
        literal_sizes = False
    literal = [a for a in varying if literal_sizes or (a < len(shape_args) and isinstance(shape_args[a], int) and shape_args[a] != -1)]
    if literal and len(literal) == len(varying):
        # A literal size on every axis the channels occupy (`x.view(-1, 96)` before a Linear,
        # `y.view(b, 64, 1, 1)`, `nn.Unflatten(1, (6, 4, 4))`, heads × head_dim) goes stale
        # once a channel is removed: pin them.
        call.cannot_follow(result[result >= 0], f"reshape to a fixed channel count at {node.name}")
        return
    if len(varying) == 1:
        return
    if not literal:
        call.cannot_follow(result[result >= 0], f"reshape splits channels at {node.name}")
        return
    # Perf: drop the axes the ids do not vary along first (a materialised attention map is
    # mostly repeats; maxvit_t spent ~75 s unioning them). Same pairs, far fewer elements.
    small = result
    for axis in set(range(result.dim())) - set(varying_axes(result)):
        small = small.narrow(axis, 0, 1)
    for a in literal:
        moved = small.movedim(a, -1).reshape(-1, small.shape[a])
        # Perf: one call for all positions along the axis (not one per position).
        call.union_pairs(moved[:, :1].expand(-1, moved.shape[1] - 1), moved[:, 1:])


def _size_sources(arg: Any, depth: int = 0) -> list[tuple[fx.Node, int, bool]]:
    """Where a size argument was read from: (tensor node, axis, direct) for `x.shape[k]`,
    `x.size(k)`, `x.size()[k]` (direct), or such reads combined by arithmetic (not direct)."""
    if not isinstance(arg, fx.Node) or depth > 8:
        return []
    if arg.op == "call_method" and arg.target == "size" and len(arg.args) > 1 and isinstance(arg.args[1], int):
        return [(arg.args[0], arg.args[1], True)] if isinstance(arg.args[0], fx.Node) else []
    if arg.target is operator.getitem and isinstance(arg.args[0], fx.Node) and isinstance(arg.args[1], int):
        base = arg.args[0]
        read = ((base.op == "call_method" and base.target == "size" and len(base.args) == 1)
                or (base.target is getattr and base.args[1:] == ("shape",)))
        if read and isinstance(base.args[0], fx.Node):
            return [(base.args[0], arg.args[1], True)]
    if arg.op == "call_function" and arg.target in _SIZE_ARITHMETIC:
        found = [src for a in arg.args for src in _size_sources(a, depth + 1)]
        return [(n, k, False) for n, k, _ in found]
    return []


def _borrowed_sizes(call: OpCall, result: torch.Tensor, ids: torch.Tensor | None) -> None:
    """A view/reshape to a size read from another tensor's channel axis (`v.reshape(B, C, H, W)`,
    `C` from the block input's shape) stays valid only while both keep the same channel count.
    Read as it is, onto an axis that alone carries the result's channels, the two are unioned
    position by position (a fixed count on one side pins the other); otherwise both are pinned.
    A size read from the very channels being reshaped (channel shuffle) is left as it was."""
    node = call.node
    shape_args = list(node.args[1:])
    if len(shape_args) == 1 and isinstance(shape_args[0], (tuple, list)):
        shape_args = list(shape_args[0])
    result_ids: set[int] | None = None  # built only when a size is borrowed (this runs for every reshape)
    varying: dict[fx.Node, list[int]] = {}
    for axis, arg in enumerate(shape_args):
        for src_node, src_axis, direct in _size_sources(arg):
            src = call.label(src_node)
            if src is None or axis >= result.dim() or src_node is node.args[0]:
                continue  # (perf) a size of the tensor being reshaped: left as it was
            src_axis %= src.dim()
            src_vec = axis_vector(src, src_axis)
            if src_vec.numel() < 2 or bool((src_vec == src_vec[0]).all()):
                continue  # (perf, before the full check) a batch or spatial size: one id along it
            if src_node not in varying:
                varying[src_node] = varying_axes(src)
            if varying[src_node] != [src_axis]:
                continue  # channels spread over several axes: left as it was
            if result_ids is None:  # `check_selection` computed them, when it ran
                result_ids = set((unique_ids(result) if ids is None else ids).tolist())
            if result_ids and result_ids <= set(src_vec.tolist()):
                continue
            if direct and set(varying_axes(result)) <= {axis} and len(src_vec) == result.shape[axis]:
                res_vec = axis_vector(result, axis)
                for a, b in zip(src_vec.tolist(), res_vec.tolist()):
                    if a >= 0 and b >= 0:
                        call.union(a, b)
                fixed = (src_vec < 0) != (res_vec < 0)
                if bool(fixed.any()):  # a fixed count on one side: the other keeps its count
                    call.pin(torch.cat([src_vec[fixed], res_vec[fixed]]),
                             f"reshape to a size read from another tensor at {node.name}")
            else:
                call.cannot_follow(torch.cat([src_vec, result.reshape(-1)]),
                                   f"reshape to a size computed from another tensor's channels at {node.name}")


# ------------------------------------------------------------------------------------------------
# Sizes that are attributes of the running module


def _split_pieces(call: OpCall, inputs: list[torch.Tensor], pieces: list[torch.Tensor]) -> None:
    """chunk/split along the channel axis: every piece must lose the same positions, unless the
    literal sizes are the running module's attributes (`_sized_by_attributes`)."""
    node = call.node
    dim = call.argument(2, "dim", 0)
    x = inputs[0] if inputs else None
    if x is None or (dim % x.dim()) not in varying_axes(x):
        return
    size_arg = node.args[1] if len(node.args) > 1 else node.kwargs.get("split_size_or_sections", node.kwargs.get("chunks"))
    sizes = {p.shape[dim] for p in pieces}
    literal_split = node.target in ("split", torch.split) and not isinstance(size_arg, fx.Node)
    if literal_split and _sized_by_attributes(call, dim, size_arg, pieces):
        return
    if len(sizes) != 1 or literal_split:
        call.cannot_follow(x[x >= 0], f"split into fixed sizes at {node.name}")
        return
    for p in pieces[1:]:
        call.union_pairs(pieces[0], p)


def _int_attr(attrs: dict[str, Any], value: int) -> str | None:
    """The one int attribute holding `value` (None when none or several do)."""
    names = [k for k, v in attrs.items() if type(v) is int and v == value]
    return names[0] if len(names) == 1 else None


def _sliced_by_attributes(call: OpCall) -> bool:
    """`x[:, :self.a]`, `x[:, self.a:]`, `x[:, 0:self.a]` along the channel axis (DPN's and
    RexNet's partial paths): a slice whose bounds are 0, open or int attributes of the running
    module stays right after pruning when each bound attribute shrinks by the channels removed
    before it. Positions j < a become slots "split:a" of that module (as for split sizes: two
    tensors sliced by one attribute lose the same positions). False: not such a slice."""
    node = call.node
    x, index = call.label(node.args[0]), node.args[1] if len(node.args) > 1 else None
    if x is None or not isinstance(index, tuple) or len(index) > x.dim():
        return False
    cut = [k for k, i in enumerate(index) if i != slice(None)]
    if len(cut) != 1 or not isinstance(index[cut[0]], slice) or index[cut[0]].step not in (None, 1):
        return False
    axis, sl = cut[0], index[cut[0]]
    running = call.running_module()  # (perf) after the cheap checks: this runs for every getitem
    if running is None or axis not in varying_axes(x):
        return False
    path, attrs = running
    bounds = []
    for value, may_be_zero in ((sl.start, True), (sl.stop, False)):
        if value is None or (may_be_zero and value == 0):
            continue
        name = _int_attr(attrs, value) if type(value) is int and value > 0 else None
        if name is None:
            return False
        bounds.append((name, value))
    if not bounds:
        return False
    vec = call.channel_vector(x, axis, node.name).tolist()
    for name, value in bounds:
        for j in range(min(value, len(vec))):
            call.link_slot((path, f"split:{name}", j), vec[j])
    return True


def _sized_by_attributes(call: OpCall, dim: int, size_arg: Any, pieces: list[torch.Tensor]) -> bool:
    """A split whose literal sizes are attributes of the module that runs it
    (`torch.split(x, self.split_indices)`, `x.split(self.width, 1)`, `[self.a, self.b]`,
    `(self.c, self.c)`): its pieces may lose channels when surgery rewrites those attributes. One
    slot per channel position on that module, kind "split:ATTR" (an int) or "split:ATTR:P"
    (element P of a tuple). Equal pieces of one int size lose the same positions. False when the
    sizes are not unambiguously such attributes (fx traces only: the module is the node's
    innermost one)."""
    running = call.running_module()
    if running is None:
        return False
    path, attrs = running
    if isinstance(size_arg, int):
        if any(p.shape[dim] != size_arg for p in pieces):
            return False  # a shorter last piece
        names = [_int_attr(attrs, size_arg)] * len(pieces)
    elif isinstance(size_arg, (tuple, list)) and all(type(v) is int for v in size_arg):
        whole = [k for k, v in attrs.items() if isinstance(v, (tuple, list)) and list(v) == list(size_arg)]
        names = [f"{whole[0]}:{p}" for p in range(len(pieces))] if len(whole) == 1 else \
            [_int_attr(attrs, v) for v in size_arg]
    else:
        return False
    if None in names:
        return False
    if len(set(names)) == 1:  # one size for every piece (`self.width`, `(self.c, self.c)`): same positions
        for p in pieces[1:]:
            call.union_pairs(pieces[0], p)
        pieces = pieces[:1]
    elif len(set(names)) != len(names):
        return False
    for piece, kind in zip(pieces, [f"split:{n}" for n in dict.fromkeys(names)]):
        for j, i in enumerate(call.channel_vector(piece, dim, call.node.name).tolist()):
            call.link_slot((path, kind, j), i)
    return True


def register_structural_ops() -> None:
    for op in _STRUCTURAL:
        register_op_rule(op, structural)
    for ops, rule in (((operator.getitem,), getitem), ((F.pad,), pad), (("expand",), expand),
                      (("expand_as",), expand_as),
                      (("view", "reshape", torch.reshape, "view_as", "reshape_as", "unflatten", torch.unflatten), reshape),
                      (("chunk", torch.chunk, "split", torch.split), pieces), (("unbind", torch.unbind), unbind)):
        for op in ops:
            register_op_rule(op, rule)


register_structural_ops()
