"""Trace a model and find its groups of coupled channels.

How it works. The model is traced with torch.fx (in eval *and* train mode, so auxiliary heads
count) and run once on a random input to learn every tensor's shape and every Python value (sizes,
split points). Then each tensor is given a *label tensor* of the same shape whose elements are
channel ids: every producer (conv/linear output), consumer input, norm entry and pad position is a
"slot" with an id in a union-find. Ops that mix channels the same way for every element (add,
mul, cat, split, view, permute, pad, pooling, ...) are replayed on the labels themselves, and ids
that must be removed together are unioned. A *class* is a union-find set: the slots that stand or
fall together. A *group* is a set of classes that share producer layers; it gets one score vector.

Anything the engine cannot follow pins the ids it touches, with a reason naming the op: a pinned
class is never removed, so the engine may be conservative but never silently wrong. The surgery
module's equivalence check then proves each pruned model against the masked original.
"""

from __future__ import annotations

import copy
import fnmatch
import math
import operator
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn
from torchvision.ops import stochastic_depth

from ..errors import UserError
from .recording import Shape, record, setitem, summarize
from .layer_rules import PRODUCER_KINDS, UNTRACKED, ModuleCost, Slot, TraceOptions, is_registered_leaf, rule_for

_ELEMENTWISE_FUNCTIONS = {
    F.relu, F.relu6, F.leaky_relu, F.elu, F.selu, F.celu, F.gelu, F.silu, F.mish, F.hardswish,
    F.hardsigmoid, F.hardtanh, F.sigmoid, F.tanh, F.softplus, F.dropout, F.dropout1d, F.dropout2d,
    F.dropout3d, F.alpha_dropout, torch.relu, torch.sigmoid, torch.tanh, torch.clamp, torch.clip,
    torch.exp, torch.abs, torch.neg, torch.sqrt, torch.rsqrt, operator.neg,
    stochastic_depth,  # scales whole samples: every channel alike
}
_ELEMENTWISE_METHODS = {
    "relu", "relu_", "sigmoid", "sigmoid_", "tanh", "tanh_", "clamp", "clamp_", "clip", "clip_",
    "contiguous", "float", "double", "half", "bfloat16", "to", "type_as", "detach", "clone",
    "exp", "abs", "neg", "sqrt", "rsqrt", "hardtanh_",
}
_BINARY_FUNCTIONS = {
    operator.add, operator.iadd, operator.sub, operator.isub, operator.mul, operator.imul,
    operator.truediv, operator.itruediv, torch.add, torch.sub, torch.mul, torch.div,
    torch.maximum, torch.minimum,
}
_BINARY_METHODS = {"add", "add_", "sub", "sub_", "mul", "mul_", "div", "div_", "maximum", "minimum"}
_PER_CHANNEL_SPATIAL_FUNCTIONS = {
    F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d, F.adaptive_max_pool1d,
    F.adaptive_max_pool2d, F.adaptive_max_pool3d, F.avg_pool1d, F.avg_pool2d, F.avg_pool3d,
    F.max_pool1d, F.max_pool2d, F.max_pool3d, F.interpolate,
}


def _roi_ops() -> set[Any]:
    """torchvision's RoI pooling (detectors' second stage): output channel c of every box is pooled
    from input channel c alone, whatever the boxes, so it passes channels like a pooling layer.
    (The position-sensitive variants mix channels and are not here.)"""
    import torchvision.ops

    ops: set[Any] = {torchvision.ops.roi_align, torchvision.ops.roi_pool}
    for name in ("roi_align", "roi_pool"):
        packet = getattr(torch.ops.torchvision, name, None)
        if packet is not None:
            ops |= {packet, packet.default}
    return ops


_PER_CHANNEL_SPATIAL_FUNCTIONS |= _roi_ops()
# Ops replayed on the label tensors themselves.
_STRUCTURAL_FUNCTIONS = {
    torch.flatten, torch.reshape, torch.permute, torch.transpose, torch.cat, torch.concat,
    torch.concatenate, torch.stack, torch.chunk, torch.split, torch.squeeze, torch.unsqueeze,
    torch.narrow, torch.movedim, operator.getitem, F.pad, torch.unflatten, torch.unbind,
}
_STRUCTURAL_METHODS = {
    "view", "reshape", "flatten", "permute", "transpose", "squeeze", "unsqueeze", "chunk",
    "split", "narrow", "movedim", "unflatten", "expand", "expand_as", "repeat", "t", "unbind",
    "view_as", "reshape_as",
}
_RESHAPES = {"view", "reshape", torch.reshape, "unflatten", torch.unflatten, "view_as", "reshape_as"}
_SIZE_ARITHMETIC = {operator.add, operator.sub, operator.mul, operator.floordiv, operator.truediv, operator.mod,
                    operator.neg, int, math.prod}
# Structural methods whose second tensor only lends its shape.
_SHAPE_FROM_OTHER = {"expand_as", "view_as", "reshape_as"}
_REDUCTIONS = {"mean", "sum", "amax", "amin", torch.mean, torch.sum, torch.amax, torch.amin}
# Normalise along one axis: channels pass unless that axis is the channel axis.
_SOFTMAXES = {F.softmax, F.log_softmax, torch.softmax, torch.log_softmax, "softmax", "log_softmax"}
# Ops whose tensor inputs only contribute their shape (or nothing channel-wise).
_SHAPE_ONLY = {"size", "dim", "numel", getattr, torch.numel, "new_zeros", "new_ones", "new_empty",
               torch.zeros_like, torch.ones_like, torch.empty_like, torch._assert}


@dataclass
class ChannelGroup:
    """Coupled channels that must lose the same indices; scored as one vector."""

    id: int
    name: str
    members: list[str]
    classes: list[list[Slot]]
    pinned: dict[int, str] = field(default_factory=dict)  # class index -> why it must stay
    approximate: dict[int, str] = field(default_factory=dict)  # class index -> why removing it is not exact

    @property
    def channels(self) -> int:
        return len(self.classes)

    @property
    def prunable_classes(self) -> list[int]:
        return [i for i in range(len(self.classes)) if i not in self.pinned]

    @property
    def prunable(self) -> bool:
        return self.channels >= 2 and len(self.prunable_classes) >= 1

    @property
    def reason(self) -> str | None:
        """Why the group (or part of it) cannot be pruned; None when fully prunable."""
        reasons = sorted(set(self.pinned.values()))
        if not reasons and self.prunable:
            return None
        if not reasons:
            return "a single channel"
        text = "; ".join(reasons[:3]) + (f" (+{len(reasons) - 3} more)" if len(reasons) > 3 else "")
        if self.prunable:
            return f"{len(self.pinned)} of {self.channels} channels kept: {text}"
        return text


@dataclass
class ChannelGraph:
    groups: list[ChannelGroup]
    costs: dict[str, ModuleCost]
    input_shape: tuple[int, ...]
    unfollowed: list[str]  # ops the engine could not follow (their channels are pinned)
    tracing: str = "fx"  # "fx" (symbolic) or "recorded" (a real forward; torch.fx could not trace the model)

    def prunable_groups(self) -> list[ChannelGroup]:
        return [g for g in self.groups if g.prunable]

    def approximations(self, plan: Mapping[int, Sequence[int]]) -> list[str]:
        """Why removing the planned channels is not exact (empty: the plan is proven by verify)."""
        by_id = {g.id: g for g in self.groups}
        return sorted({by_id[gid].approximate[c] for gid, cs in plan.items() for c in cs if c in by_id[gid].approximate})


class _UnionFind:
    def __init__(self) -> None:
        self.parent: list[int] = []
        self.slot_of: list[Slot | None] = []
        self.id_of: dict[Slot, int] = {}
        self.pin_reason: dict[int, str] = {}
        self.approx_reason: dict[int, str] = {}

    def new(self, slot: Slot | None = None) -> int:
        if slot is not None and slot in self.id_of:
            return self.id_of[slot]
        i = len(self.parent)
        self.parent.append(i)
        self.slot_of.append(slot)
        if slot is not None:
            self.id_of[slot] = i
        return i

    def find(self, i: int) -> int:
        root = i
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[i] != root:
            self.parent[i], i = root, self.parent[i]
        return root

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)

    def union_pairs(self, a: torch.Tensor, b: torch.Tensor) -> None:
        # Shrink to the axes along which either varies: labels are mostly broadcast vectors.
        keep = set(_varying_axes(a)) | set(_varying_axes(b))
        for axis in range(a.dim()):
            if axis not in keep and a.shape[axis] > 1:
                a, b = a.narrow(axis, 0, 1), b.narrow(axis, 0, 1)
        mask = (a >= 0) & (b >= 0) & (a != b)
        if not mask.any():
            return
        # Perf (maxvit_t spent ~80 s here): `stack(...).unique(dim=1)` sorts every pair. Dedupe
        # in O(n) instead: scatter one partner per id and union those; the pairs that disagree
        # with it (rare: an id meeting several partners) are deduplicated by a 1-D sort of a
        # combined key. Same unions as before.
        a, b = a[mask], b[mask]
        partner = torch.full((int(a.max()) + 1,), UNTRACKED, dtype=torch.long)
        partner[a] = b
        ids = _unique_ids(a)
        for x, y in zip(ids.tolist(), partner[ids].tolist()):
            self.union(x, y)
        rest = b != partner[a]
        if rest.any():
            a, b = a[rest], b[rest]
            width = int(b.max()) + 1
            for key in (a * width + b).unique().tolist():
                self.union(key // width, key % width)

    def approximate(self, ids: Iterable[int], reason: str) -> None:
        for i in ids:
            self.approx_reason.setdefault(i, reason)

    def pin(self, ids: torch.Tensor | Iterable[int], reason: str) -> None:
        values = _unique_ids(ids).tolist() if isinstance(ids, torch.Tensor) else set(ids)
        for i in values:
            if i >= 0:
                self.pin_reason.setdefault(i, reason)


def _along(t: torch.Tensor, axis: int) -> torch.Tensor:
    """`t` along `axis`, at index 0 of every other axis (a view, no copy)."""
    return t[(0,) * axis + (slice(None),) + (0,) * (t.dim() - axis - 1)]


def _axis_vector(t: torch.Tensor, axis: int) -> torch.Tensor:
    """The ids along `axis` (UNTRACKED for an empty tensor)."""
    return _along(t, axis) if t.numel() else t.new_full((t.shape[axis],), UNTRACKED)


def _compact(t: torch.Tensor) -> torch.Tensor:
    """The same label tensor without its broadcast (stride-0) repeats: same set of ids, free."""
    for axis in range(t.dim()):
        if t.stride(axis) == 0 and t.shape[axis] > 1:
            t = t.narrow(axis, 0, 1)
    return t


def _id_values(t: torch.Tensor) -> torch.Tensor:
    """The ids a label tensor refers to: its elements, without broadcast repeats. An empty view (a
    tensor with no rows in the example input, e.g. a detector level no box went to) still refers to
    its channels through its storage: those ids, so that it stays followed, and is pinned whole
    (conservatively) where it cannot be followed."""
    if t.numel() or not t.untyped_storage().nbytes():
        return _compact(t)
    return torch.empty(0, dtype=t.dtype).set_(t.untyped_storage())


def _unique_ids(t: torch.Tensor) -> torch.Tensor:
    """Sorted distinct non-negative ids of a label tensor.

    Perf: `Tensor.unique` sorts (0.1-0.25 s on a 1.6M-element label map, called thousands of times
    for maxvit_t); ids are small non-negative ints, so marking them in a bitmap is O(n)."""
    t = _id_values(t)
    t = t[t >= 0] if t.numel() else t.reshape(-1)
    if not t.numel():
        return torch.empty(0, dtype=torch.long)
    seen = torch.zeros(int(t.max()) + 1, dtype=torch.bool)
    seen[t.reshape(-1)] = True
    return seen.nonzero().reshape(-1)


class _Tracer(fx.Tracer):
    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return is_registered_leaf(m) or super().is_leaf_module(m, module_qualified_name)


def trace(model: nn.Module) -> fx.GraphModule:
    graph = _Tracer().trace(model)
    return fx.GraphModule(model, graph)


class _ShapeInterpreter(fx.Interpreter):
    """Runs the traced model once, keeping shapes of tensors and values of everything else."""

    def __init__(self, gm: fx.GraphModule) -> None:
        super().__init__(gm)
        self.values: dict[fx.Node, Any] = {}

    def run_node(self, n: fx.Node) -> Any:
        result = super().run_node(n)
        self.values[n] = summarize(result)
        return result


def _varying_axes(t: torch.Tensor) -> list[int]:
    axes = []
    t = _compact(t)  # perf: broadcast axes never vary; compare the rest on the small tensor
    for a in range(t.dim()):
        if t.shape[a] > 1 and t.stride(a) != 0 and not bool((t == t.narrow(a, 0, 1)).all()):
            axes.append(a)
    return axes


def _pad_labels(x: torch.Tensor, pad: Sequence[int], mode: str = "constant", value: int = UNTRACKED) -> torch.Tensor:
    """F.pad on labels. New positions along an axis the ids do not vary along (a spatial pad)
    belong to the same channels, so they repeat the ids; only padding an axis the ids vary along
    (the channel axis) adds untracked channels. (UNTRACKED spatial padding would make the ids vary
    spatially and pin everything downstream: pooling, Linear, reductions over H, W.)"""
    varying = set(_varying_axes(x))
    for i in range(len(pad) // 2):
        axis, before, after = x.dim() - 1 - i, int(pad[2 * i]), int(pad[2 * i + 1])
        if before == 0 and after == 0:
            continue
        if axis in varying or x.shape[axis] <= 1:
            x = F.pad(x, (0, 0) * i + (before, after), mode="constant", value=value)
        else:  # constant along this axis: every position, old or new, holds the same ids
            shape = list(x.shape)
            shape[axis] += before + after
            x = x.narrow(axis, 0, 1).expand(shape)
    return x


class _Propagator:
    """Walks one traced graph, replaying channel-mixing ops on label tensors."""

    def __init__(self, graph: fx.Graph, modules: dict[str, nn.Module], values: dict[fx.Node, Any], uf: _UnionFind,
                 costs: dict[str, ModuleCost], unfollowed: list[str], options: TraceOptions,
                 module_stacks: bool = False) -> None:
        self.options = options
        # fx records which module runs each node (none: the root). A recording does not, and its
        # literal sizes may have been read from another tensor's shape: no attribute matching there.
        self.module_stacks = module_stacks
        self.graph = graph
        self.modules = modules
        self.values = values
        self.uf = uf
        self.costs = costs
        self.unfollowed = unfollowed
        self.labels: dict[fx.Node, Any] = {}

    # -- helpers -----------------------------------------------------------------------------
    def _label(self, arg: Any) -> torch.Tensor | None:
        """Label tensor of a node argument, or None when it is not a tensor."""
        if isinstance(arg, fx.Node):
            lab = self.labels.get(arg)
            if isinstance(lab, torch.Tensor):
                return lab
            meta = self.values.get(arg)
            if isinstance(meta, Shape):
                return torch.full((1,) if meta.shape else (), UNTRACKED, dtype=torch.long).expand(meta.shape)
        return None

    def _concrete(self, arg: Any, for_labels: bool) -> Any:
        def convert(a: fx.Node) -> Any:
            if for_labels:
                lab = self.labels.get(a)
                if lab is not None:
                    return lab.contiguous() if isinstance(lab, torch.Tensor) else tuple(
                        x.contiguous() if isinstance(x, torch.Tensor) else x for x in lab)
                if isinstance(self.values.get(a), Shape):
                    return torch.full(self.values[a].shape, UNTRACKED, dtype=torch.long)
            return self.values.get(a)

        return fx.node.map_arg(arg, convert)

    def _tensor_inputs(self, node: fx.Node, skip_first: bool = False) -> list[torch.Tensor]:
        out: list[torch.Tensor] = []

        def collect(a: fx.Node) -> None:
            lab = self.labels.get(a)
            if isinstance(lab, tuple):
                out.extend(t for t in lab if isinstance(t, torch.Tensor))
            elif (t := self._label(a)) is not None:
                out.append(t)

        fx.node.map_arg((node.args[1:] if skip_first else node.args, node.kwargs), collect)
        return out

    def _pin_inputs(self, node: fx.Node, reason: str) -> None:
        tracked = [t for t in self._tensor_inputs(node) if bool((_id_values(t) >= 0).any())]
        if tracked:
            self.unfollowed.append(reason)
            for t in tracked:
                self.uf.pin(t, reason)  # perf: pin() compacts and skips untracked ids

    def _untracked_output(self, node: fx.Node) -> None:
        self.labels[node] = None

    def _channel_vector(self, lab: torch.Tensor, axis: int, node: fx.Node, what: str) -> torch.Tensor:
        """The ids along `axis`; pins and returns untracked ids when they also vary elsewhere."""
        axis = axis % lab.dim()
        if not lab.numel() and lab.shape[axis]:
            # An empty view (no rows in the example: a detector's stage with no boxes) still holds
            # its channels in its storage; a storage that does not fails here, and the op is pinned.
            return torch.as_strided(lab, (lab.shape[axis],), (lab.stride(axis),), lab.storage_offset())
        vec = _along(lab, axis)
        if any(a != axis for a in _varying_axes(lab)):
            reason = f"channels mixed with other axes before {what} ({node.name})"
            self.unfollowed.append(reason)
            self.uf.pin(lab, reason)
            return torch.full_like(vec, UNTRACKED)
        return vec

    @staticmethod
    def _broadcast_vec(vec: torch.Tensor, axis: int, shape: Sequence[int]) -> torch.Tensor:
        view = [1] * len(shape)
        view[axis % len(shape)] = vec.numel()
        return vec.view(view).expand(tuple(shape))

    def _out_shape(self, node: fx.Node) -> tuple[int, ...] | None:
        meta = self.values.get(node)
        return meta.shape if isinstance(meta, Shape) else None

    # -- main loop ---------------------------------------------------------------------------
    def run(self) -> None:
        for node in self.graph.nodes:
            if node.op in ("placeholder", "get_attr"):
                self._untracked_output(node)
            elif node.op == "output":
                for t in self._tensor_inputs(node):
                    self.uf.pin(t, "model output")
            else:
                try:
                    self._call_module(node) if node.op == "call_module" else self._call_op(node)
                except Exception as exc:  # noqa: BLE001  (an op the labels cannot replay: keep its channels)
                    self._pin_inputs(node, f"cannot follow {node.name}: {type(exc).__name__}")
                    self._untracked_output(node)

    def _call_module(self, node: fx.Node) -> None:
        """A leaf module call: its layer rule labels the output (engine/layer_rules.py)."""
        name = str(node.target)
        m = self.modules[name]
        call = _Call(self, node, name, m)
        rule = rule_for(m)
        if rule is None or not rule.trace(call):
            self._pin_inputs(node, f"unsupported module {type(m).__name__} ({name})")
            self._untracked_output(node)

    def _fresh(self, owner: str, kind: str, count: int) -> torch.Tensor:
        return torch.tensor([self.uf.new((owner, kind, k)) for k in range(count)], dtype=torch.long)

    def _link(self, slot_id: int, label: int) -> None:
        if label >= 0:
            self.uf.union(slot_id, label)

    def _per_channel_spatial(self, node: fx.Node, x: torch.Tensor, shape: tuple[int, ...], what: str) -> None:
        vec = self._channel_vector(x, 1, node, what)
        self.labels[node] = self._broadcast_vec(vec, 1, shape) if bool((vec >= 0).any()) else None

    def _call_op(self, node: fx.Node) -> None:
        target = node.target
        is_method = node.op == "call_method"
        inputs = self._tensor_inputs(node)
        tracked = [t for t in inputs if bool((_id_values(t) >= 0).any())]  # perf: no full-size compare
        shape = self._out_shape(node)
        name = target if isinstance(target, str) else getattr(target, "__name__", str(target))

        container = self.labels.get(node.args[0]) if node.args and isinstance(node.args[0], fx.Node) else None
        if target is setitem and self._rows_written(node):
            return
        if target is operator.getitem and isinstance(container, tuple):
            self.labels[node] = container[self._concrete(node.args[1], for_labels=False)]
            return
        if not tracked:
            self._untracked_output(node)
            return
        if target in _SHAPE_ONLY or (is_method and target in _SHAPE_ONLY):
            self._untracked_output(node)
        elif (target in _ELEMENTWISE_FUNCTIONS or (is_method and target in _ELEMENTWISE_METHODS)) and len(tracked) == 1 and shape is not None:
            first = self._label(node.args[0])
            if first is not None and tuple(first.shape) == shape and len(inputs) == 1:
                self.labels[node] = first
            else:
                self._binary(node, shape)
        elif target in _BINARY_FUNCTIONS or (is_method and target in _BINARY_METHODS):
            if shape is None:
                self._pin_inputs(node, f"{name} ({node.name}) gives a non-tensor")
                self._untracked_output(node)
            else:
                self._binary(node, shape)
        elif target in _PER_CHANNEL_SPATIAL_FUNCTIONS and shape is not None and (x := self._label(node.args[0])) is not None:
            self._per_channel_spatial(node, x, shape, name)
        elif target in _REDUCTIONS or (is_method and target in _REDUCTIONS):
            self._reduction(node, shape)
        elif target in _SOFTMAXES and (x := self._label(node.args[0])) is not None:
            dim = self._concrete(node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else None), for_labels=False)
            if not isinstance(dim, int) or dim % x.dim() in _varying_axes(x):
                self._pin_inputs(node, f"{name} over channels ({node.name})")
                self._untracked_output(node)
            else:
                self.labels[node] = x
        elif target in _STRUCTURAL_FUNCTIONS or (is_method and target in _STRUCTURAL_METHODS):
            fn: Callable[..., Any] = (lambda *a, **k: getattr(a[0], target)(*a[1:], **k)) if is_method else target  # type: ignore[assignment]
            self._structural(node, fn, literal_sizes=False)
        else:
            self._pin_inputs(node, f"unsupported op {name} ({node.name})")
            self._untracked_output(node)

    def _rows_written(self, node: fx.Node) -> bool:
        """`dest[rows] = value` (torchvision's multi-scale RoI pooling fills a zeros tensor level by
        level): when only the leading axis is indexed, channel c of `dest` holds channel c of
        `value`, of earlier writes, or zeros. A fresh `dest` takes `value`'s channels from here on;
        one written before has its channels unioned with `value`'s, as an addition would. Anything
        else stays an unknown op (False)."""
        dest, index, value = node.args[:3]
        shape = self._out_shape(dest) if isinstance(dest, fx.Node) else None
        lab, known = self._label(value), self.labels.get(dest) if isinstance(dest, fx.Node) else None
        leading_only = not isinstance(index, tuple) or all(i == slice(None) for i in index[1:])
        if shape is None or len(shape) < 2 or lab is None or lab.dim() < 2 or lab.shape[1] != shape[1] or not leading_only:
            return False
        vec = self._channel_vector(lab, 1, node, "setitem")
        if not bool((vec >= 0).all()):
            return False
        if isinstance(known, torch.Tensor) and bool((_id_values(known) >= 0).any()):
            earlier = self._channel_vector(known, 1, node, "setitem")
            if not bool((earlier >= 0).all()):
                return False
            for a, b in zip(earlier.tolist(), vec.tolist()):
                self.uf.union(a, b)
            return True
        self.labels[dest] = self._broadcast_vec(vec, 1, shape)
        return True

    def _binary(self, node: fx.Node, shape: tuple[int, ...]) -> None:
        """Elementwise op: ids meeting at one position are unioned. A tracked channel meeting a
        fixed per-channel tensor is pinned (that tensor cannot be sliced), unless the tensor is a
        module's parameter or buffer varying along the channel axis only (a layer scale, a
        per-channel bias): then its entries are slots of the channels they meet."""
        operands = [(a, lab) for a in (*node.args, *node.kwargs.values()) if (lab := self._label(a)) is not None]
        labs = [lab for _, lab in operands]
        full = [t.expand(shape) if t.dim() == len(shape) else t.reshape((1,) * (len(shape) - t.dim()) + tuple(t.shape)).expand(shape) for t in labs]
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
            self.uf.union_pairs(base, other)
            # Elements where a tracked id meets an untracked value that differs per channel.
            if bool(((other < 0) & (base >= 0)).any()) or bool(((base < 0) & (other >= 0)).any()):
                aligned = (1,) * (len(shape) - orig.dim()) + tuple(orig.shape)
                axes = set(_varying_axes(base)) | set(_varying_axes(other))
                if any(aligned[a] > 1 for a in axes) and not self._tensor_slots(arg, aligned, base):
                    mixed = torch.where(base >= 0, base, other)
                    bad = mixed[((other < 0) & (base >= 0)) | ((base < 0) & (other >= 0))]
                    reason = f"{node.name} combines channels with a fixed per-channel tensor"
                    self.unfollowed.append(reason)
                    self.uf.pin(bad, reason)
        merged = base
        for other in tracked[1:]:
            merged = torch.where(merged >= 0, merged, other)
        self.labels[node] = merged.expand(shape)

    def _tensor_slots(self, arg: Any, aligned: tuple[int, ...], tracked: torch.Tensor) -> bool:
        """Link the entries of a module's parameter/buffer (reached from `arg` through reshapes)
        to the channels they meet, when both vary along one and the same axis only; slot kind
        "tensor:ATTR:DIM" on the owning module (surgery slices ATTR along DIM)."""
        origin = _tensor_origin(arg, self.modules)
        varying = _varying_axes(tracked)
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
            self._link(self.uf.new((owner, f"tensor:{attr}:{dims[0]}", c)), i)
        return True

    def _reduction(self, node: fx.Node, shape: tuple[int, ...] | None) -> None:
        x = self._label(node.args[0])
        dims = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else None)
        dims = self._concrete(dims, for_labels=False)
        keepdim = bool(self._concrete(node.kwargs.get("keepdim", node.args[2] if len(node.args) > 2 else False), for_labels=False))
        if x is None or dims is None or shape is None:
            self._pin_inputs(node, f"reduction over all axes ({node.name})")
            self._untracked_output(node)
            return
        dims_list = [d % x.dim() for d in (dims if isinstance(dims, (tuple, list)) else [dims])]
        varying = _varying_axes(x)
        if any(d in varying for d in dims_list):
            self._pin_inputs(node, f"reduction over channels ({node.name})")
            self._untracked_output(node)
            return
        out = x
        for d in sorted(dims_list, reverse=True):
            out = out.narrow(d, 0, 1)
            if not keepdim:
                out = out.squeeze(d)
        self.labels[node] = out.expand(shape) if tuple(out.shape) != shape else out

    def _structural(self, node: fx.Node, fn: Callable[..., Any], literal_sizes: bool) -> None:
        args = self._concrete(node.args, for_labels=True)
        kwargs = self._concrete(node.kwargs, for_labels=True)
        target = node.target
        if target is F.pad:
            mode = kwargs.get("mode", args[2] if len(args) > 2 else "constant")
            if mode != "constant":
                self._pin_inputs(node, f"non-constant pad ({node.name})")
                self._untracked_output(node)
                return
            kwargs = {"mode": "constant", "value": UNTRACKED}
            args = args[:2]
            fn = _pad_labels
        try:
            result = fn(*args, **kwargs)
        except Exception as exc:  # the op behaves differently on labels: cannot follow it
            self._pin_inputs(node, f"cannot follow {node.name}: {type(exc).__name__}")
            self._untracked_output(node)
            return
        inputs = self._tensor_inputs(node)
        if target in _SHAPE_FROM_OTHER:
            # The other tensor only gives a shape; counting its ids as inputs would make every
            # `s.expand_as(x)` look like a channel selection (SE blocks written that way).
            inputs = [t for t in (self._label(node.args[0]),) if t is not None]
        if isinstance(result, torch.Tensor):
            result_ids = None
            if not (target is operator.getitem and self._sliced_by_attributes(node)):
                result_ids = self._check_selection(node, inputs, [result])
            if target == "expand":
                self._check_fixed_expand(node, result)
            if target in _RESHAPES or literal_sizes:
                result = self._resolve_split_axes(node, result, literal_sizes)
            if target in ("view", "reshape", torch.reshape):
                self._borrowed_sizes(node, result, result_ids)
            self.labels[node] = result
        elif isinstance(result, (tuple, list)) and all(isinstance(r, torch.Tensor) for r in result):
            if target in ("chunk", torch.chunk, "split", torch.split):
                self._pieces(node, inputs, list(result))
            elif target in ("unbind", torch.unbind):
                self._unbind(node, inputs)
            self.labels[node] = tuple(result)
        else:
            self.labels[node] = None

    def _size_sources(self, arg: Any, depth: int = 0) -> list[tuple[fx.Node, int, bool]]:
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
            found = [src for a in arg.args for src in self._size_sources(a, depth + 1)]
            return [(n, k, False) for n, k, _ in found]
        return []

    def _borrowed_sizes(self, node: fx.Node, result: torch.Tensor, ids: torch.Tensor | None) -> None:
        """A view/reshape to a size read from another tensor's channel axis (`v.reshape(B, C, H, W)`,
        `C` from the block input's shape) stays valid only while both keep the same channel count.
        Read as it is, onto an axis that alone carries the result's channels, the two are unioned
        position by position (a fixed count on one side pins the other); otherwise both are pinned.
        A size read from the very channels being reshaped (channel shuffle) is left as it was."""
        shape_args = list(node.args[1:])
        if len(shape_args) == 1 and isinstance(shape_args[0], (tuple, list)):
            shape_args = list(shape_args[0])
        result_ids: set[int] | None = None  # built only when a size is borrowed (this runs for every reshape)
        varying: dict[fx.Node, list[int]] = {}
        for axis, arg in enumerate(shape_args):
            for src_node, src_axis, direct in self._size_sources(arg):
                src = self._label(src_node)
                if src is None or axis >= result.dim() or src_node is node.args[0]:
                    continue  # (perf) a size of the tensor being reshaped: as before
                src_axis %= src.dim()
                src_vec = _axis_vector(src, src_axis)
                if src_vec.numel() < 2 or bool((src_vec == src_vec[0]).all()):
                    continue  # (perf, before the full check) a batch or spatial size: one id along it
                if src_node not in varying:
                    varying[src_node] = _varying_axes(src)
                if varying[src_node] != [src_axis]:
                    continue  # channels spread over several axes: left as it was
                if result_ids is None:  # `_check_selection` computed them, when it ran
                    result_ids = set((_unique_ids(result) if ids is None else ids).tolist())
                if result_ids and result_ids <= set(src_vec.tolist()):
                    continue
                if direct and set(_varying_axes(result)) <= {axis} and len(src_vec) == result.shape[axis]:
                    res_vec = _axis_vector(result, axis)
                    for a, b in zip(src_vec.tolist(), res_vec.tolist()):
                        if a >= 0 and b >= 0:
                            self.uf.union(a, b)
                    fixed = (src_vec < 0) != (res_vec < 0)
                    if bool(fixed.any()):  # a fixed count on one side: the other keeps its count
                        self.uf.pin(torch.cat([src_vec[fixed], res_vec[fixed]]),
                                    f"reshape to a size read from another tensor at {node.name}")
                else:
                    reason = f"reshape to a size computed from another tensor's channels at {node.name}"
                    self.unfollowed.append(reason)
                    self.uf.pin(torch.cat([src_vec, result.reshape(-1)]), reason)

    def _check_fixed_expand(self, node: fx.Node, result: torch.Tensor) -> None:
        """`x.expand(-1, 64, h, w)` keeps a literal channel count that goes stale when a channel
        is removed (the pruned model would crash): pin the channels along such an axis."""
        sizes = list(node.args[1:])
        if len(sizes) == 1 and isinstance(sizes[0], (tuple, list)):
            sizes = list(sizes[0])
        fixed = [a for a in _varying_axes(result) if a != 0 and a < len(sizes)
                 and isinstance(sizes[a], int) and sizes[a] != -1]
        if fixed:
            reason = f"expand to a fixed channel count at {node.name}"
            self.unfollowed.append(reason)
            self.uf.pin(result[result >= 0], reason)

    def _check_selection(self, node: fx.Node, inputs: list[torch.Tensor], outputs: list[torch.Tensor]) -> torch.Tensor:
        """A structural op that drops channel ids (slicing, indexing) pins the channels involved.
        Returns the outputs' ids."""
        # Perf: fast id sets on compacted labels (was cat + Tensor.unique on materialised maps).
        before = _unique_ids(torch.cat([_compact(t).reshape(-1) for t in inputs])) if inputs else torch.empty(0, dtype=torch.long)
        after = _unique_ids(torch.cat([_compact(t).reshape(-1) for t in outputs]))
        if before.numel() != after.numel():
            reason = f"channel selection at {node.name}"
            self.unfollowed.append(reason)
            self.uf.pin(before, reason)
        return after

    def _unbind(self, node: fx.Node, inputs: list[torch.Tensor]) -> None:
        """Unbinding the channel axis makes every channel a tensor of its own: pin them."""
        dim = self._concrete(node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else 0), for_labels=False)
        x = inputs[0] if inputs else None
        if x is not None and isinstance(dim, int) and dim % x.dim() in _varying_axes(x):
            reason = f"channels unbound at {node.name}"
            self.unfollowed.append(reason)
            self.uf.pin(x[x >= 0], reason)

    def _pieces(self, node: fx.Node, inputs: list[torch.Tensor], pieces: list[torch.Tensor]) -> None:
        """chunk/split along the channel axis: every piece must lose the same positions."""
        dim = self._concrete(node.kwargs.get("dim", node.args[2] if len(node.args) > 2 else 0), for_labels=False)
        x = inputs[0] if inputs else None
        if x is None or (dim % x.dim()) not in _varying_axes(x):
            return
        size_arg = node.args[1] if len(node.args) > 1 else node.kwargs.get("split_size_or_sections", node.kwargs.get("chunks"))
        sizes = {p.shape[dim] for p in pieces}
        literal_split = node.target in ("split", torch.split) and not isinstance(size_arg, fx.Node)
        if literal_split and self._sized_by_attributes(node, dim, size_arg, pieces):
            return
        if len(sizes) != 1 or literal_split:
            reason = f"split into fixed sizes at {node.name}"
            self.unfollowed.append(reason)
            self.uf.pin(x[x >= 0], reason)
            return
        for p in pieces[1:]:
            self.uf.union_pairs(pieces[0], p)

    def _running_module(self, node: fx.Node) -> tuple[str, dict[str, Any]] | None:
        """The module whose forward runs `node` (fx's nn_module_stack; None in recorded traces) and
        its plain attributes."""
        if not self.module_stacks:
            return None
        stack = node.meta.get("nn_module_stack")
        path = list(stack.values())[-1][0] if stack else ""
        module = self.modules.get(path) if isinstance(path, str) else None
        if module is None:
            return None
        return path, {k: v for k, v in vars(module).items() if not k.startswith("_")}

    @staticmethod
    def _int_attr(attrs: dict[str, Any], value: int) -> str | None:
        """The one int attribute holding `value` (None when none or several do)."""
        names = [k for k, v in attrs.items() if type(v) is int and v == value]
        return names[0] if len(names) == 1 else None

    def _sliced_by_attributes(self, node: fx.Node) -> bool:
        """`x[:, :self.a]`, `x[:, self.a:]`, `x[:, 0:self.a]` along the channel axis (DPN's and
        RexNet's partial paths): a slice whose bounds are 0, open or int attributes of the running
        module stays right after pruning when each bound attribute shrinks by the channels removed
        before it. Positions j < a become slots "split:a" of that module (as for split sizes: two
        tensors sliced by one attribute lose the same positions). False: not such a slice."""
        x, index = self._label(node.args[0]), node.args[1] if len(node.args) > 1 else None
        if x is None or not isinstance(index, tuple) or len(index) > x.dim():
            return False
        cut = [k for k, i in enumerate(index) if i != slice(None)]
        if len(cut) != 1 or not isinstance(index[cut[0]], slice) or index[cut[0]].step not in (None, 1):
            return False
        axis, sl = cut[0], index[cut[0]]
        running = self._running_module(node)  # (perf) after the cheap checks: this runs for every getitem
        if running is None or axis not in _varying_axes(x):
            return False
        path, attrs = running
        bounds = []
        for value, may_be_zero in ((sl.start, True), (sl.stop, False)):
            if value is None or (may_be_zero and value == 0):
                continue
            name = self._int_attr(attrs, value) if type(value) is int and value > 0 else None
            if name is None:
                return False
            bounds.append((name, value))
        if not bounds:
            return False
        vec = self._channel_vector(x, axis, node, node.name).tolist()
        for name, value in bounds:
            for j in range(min(value, len(vec))):
                self._link(self.uf.new((path, f"split:{name}", j)), vec[j])
        return True

    def _sized_by_attributes(self, node: fx.Node, dim: int, size_arg: Any, pieces: list[torch.Tensor]) -> bool:
        """A split whose literal sizes are attributes of the module that runs it
        (`torch.split(x, self.split_indices)`, `x.split(self.width, 1)`, `[self.a, self.b]`,
        `(self.c, self.c)`): its
        pieces may lose channels when surgery rewrites those attributes. One slot per channel
        position on that module, kind "split:ATTR" (an int) or "split:ATTR:P" (element P of a
        tuple). Equal pieces of one int size lose the same positions. False when the sizes are not
        unambiguously such attributes (fx traces only: the module is the node's innermost one)."""
        running = self._running_module(node)
        if running is None:
            return False
        path, attrs = running
        if isinstance(size_arg, int):
            if any(p.shape[dim] != size_arg for p in pieces):
                return False  # a shorter last piece
            names = [self._int_attr(attrs, size_arg)] * len(pieces)
        elif isinstance(size_arg, (tuple, list)) and all(type(v) is int for v in size_arg):
            whole = [k for k, v in attrs.items() if isinstance(v, (tuple, list)) and list(v) == list(size_arg)]
            names = [f"{whole[0]}:{p}" for p in range(len(pieces))] if len(whole) == 1 else \
                [self._int_attr(attrs, v) for v in size_arg]
        else:
            return False
        if None in names:
            return False
        if len(set(names)) == 1:  # one size for every piece (`self.width`, `(self.c, self.c)`): same positions
            for p in pieces[1:]:
                self.uf.union_pairs(pieces[0], p)
            pieces = pieces[:1]
        elif len(set(names)) != len(names):
            return False
        for piece, kind in zip(pieces, [f"split:{n}" for n in dict.fromkeys(names)]):
            for j, i in enumerate(self._channel_vector(piece, dim, node, node.name).tolist()):
                self._link(self.uf.new((path, kind, j)), i)
        return True

    def _resolve_split_axes(self, node: fx.Node, result: torch.Tensor, literal_sizes: bool) -> torch.Tensor:
        """A reshape that splits the channel axis into several (channel shuffle, heads): the axes
        given as literal sizes must keep their size, so ids along them fall together."""
        varying = [a for a in _varying_axes(result) if a != 0]
        if not varying:
            return result
        shape_args = list(node.args[1:])
        if len(shape_args) == 1 and isinstance(shape_args[0], (tuple, list)):
            shape_args = list(shape_args[0])
        unflatten: tuple[Any, Any] | None = None
        if node.target in ("unflatten", torch.unflatten) and len(node.args) >= 3:
            unflatten = (self._concrete(node.args[1], for_labels=False), node.args[2])
        elif literal_sizes and isinstance(self.modules.get(str(node.target)), nn.Unflatten):
            m = self.modules[str(node.target)]
            unflatten = (m.dim, m.unflattened_size)
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
            reason = f"reshape to a fixed channel count at {node.name}"
            self.unfollowed.append(reason)
            self.uf.pin(result[result >= 0], reason)
            return result
        if len(varying) == 1:
            return result
        if not literal:
            reason = f"reshape splits channels at {node.name}"
            self.unfollowed.append(reason)
            self.uf.pin(result[result >= 0], reason)
            return result
        # Perf: drop the axes the ids do not vary along first (a materialised attention map is
        # mostly repeats; maxvit_t spent ~75 s unioning them). Same pairs, far fewer elements.
        small = result
        for axis in set(range(result.dim())) - set(_varying_axes(result)):
            small = small.narrow(axis, 0, 1)
        for a in literal:
            moved = small.movedim(a, -1).reshape(-1, small.shape[a])
            # Perf: one call for all positions along the axis (was one call per position).
            self.uf.union_pairs(moved[:, :1].expand(-1, moved.shape[1] - 1), moved[:, 1:])
        return result


class _Call:
    """One leaf-module call as its layer rule sees it (the `layer_rules.ModuleCall` protocol)."""

    def __init__(self, propagator: _Propagator, node: fx.Node, name: str, module: nn.Module) -> None:
        self._p = propagator
        self.node = node
        self.name = name
        self.module = module
        self.x = propagator._label(node.args[0]) if node.args else None
        self.shape = propagator._out_shape(node)
        self.options = propagator.options

    def set_output(self, label: Any) -> None:
        self._p.labels[self.node] = label

    def channel_vector(self, label: torch.Tensor, axis: int) -> torch.Tensor:
        return self._p._channel_vector(label, axis, self.node, self.name)

    def new_slot(self, kind: str, index: int) -> int:
        return self._p.uf.new((self.name, kind, index))

    def new_slots(self, kind: str, count: int) -> torch.Tensor:
        return self._p._fresh(self.name, kind, count)

    def link(self, slot_id: int, label: int) -> None:
        self._p._link(slot_id, label)

    def pin(self, ids: torch.Tensor | Sequence[int], reason: str) -> None:
        self._p.uf.pin(ids, reason)

    def pin_inputs(self, reason: str) -> None:
        self._p._pin_inputs(self.node, reason)

    def pin_other_inputs(self, reason: str) -> None:
        for t in self._p._tensor_inputs(self.node, skip_first=True):
            self._p.uf.pin(t, reason)

    def approximate(self, ids: torch.Tensor | Sequence[int], reason: str) -> None:
        self._p.uf.approximate(ids.tolist() if isinstance(ids, torch.Tensor) else ids, reason)

    def varying_axes(self, label: torch.Tensor) -> list[int]:
        return _varying_axes(label)

    def broadcast(self, vec: torch.Tensor, axis: int) -> torch.Tensor:
        assert self.shape is not None
        return self._p._broadcast_vec(vec, axis, self.shape)

    def add_cost(self, cost: ModuleCost) -> None:
        self._p.costs[self.name] = cost

    def structural(self, fn: Callable[..., Any], literal_sizes: bool) -> None:
        self._p._structural(self.node, fn, literal_sizes=literal_sizes)


_VIEWS_OF_A_TENSOR = {"view", "reshape", "unsqueeze", "expand", "expand_as", "to", "type_as", "contiguous", "float",
                      "double", "half", "bfloat16", torch.reshape, torch.unsqueeze}


def _tensor_origin(arg: Any, modules: dict[str, nn.Module]) -> tuple[str, str, torch.Tensor] | None:
    """(owning module, attribute, tensor) when `arg` is a module's parameter or buffer, possibly
    reshaped or cast; None otherwise."""
    while isinstance(arg, fx.Node) and arg.op in ("call_method", "call_function") and arg.target in _VIEWS_OF_A_TENSOR:
        arg = arg.args[0] if arg.args else None
    if not isinstance(arg, fx.Node) or arg.op != "get_attr":
        return None
    owner, _, attr = str(arg.target).rpartition(".")
    module = modules.get(owner)
    # registered parameters and buffers only: tensors a forward creates are constants of the trace
    tensor = module._parameters.get(attr, module._buffers.get(attr)) if module is not None else None
    return (owner, attr, tensor) if isinstance(tensor, torch.Tensor) else None


def _run_mode(model: nn.Module, example: Any, train: bool, uf: _UnionFind,
              costs: dict[str, ModuleCost], unfollowed: list[str], options: TraceOptions) -> str:
    """Trace `model` in one mode and propagate channel ids; returns how it was traced: "fx"
    (symbolic) or "recorded" (one real forward, for models torch.fx cannot trace)."""
    subject = copy.deepcopy(model) if train else model  # train mode updates BN statistics
    was_training = subject.training
    subject.train(train)
    try:
        try:
            gm = trace(subject)
        except Exception:  # noqa: BLE001  (control flow, iterated proxies, ...: record a real run instead)
            recording = record(subject, example, _Tracer().is_leaf_module)
            _Propagator(recording.graph, dict(subject.named_modules()), recording.values, uf, costs, unfollowed, options).run()
            return "recorded"
        interpreter = _ShapeInterpreter(gm)
        with torch.no_grad():
            interpreter.run(example)
        _Propagator(gm.graph, dict(subject.named_modules()), interpreter.values, uf, costs, unfollowed, options,
                    module_stacks=True).run()
        return "fx"
    finally:
        subject.train(was_training)


def build_graph(model: nn.Module, input_shape: Sequence[int], ignore: Sequence[str] = (),
                train_mode: bool = True, through_layernorm: bool = False) -> ChannelGraph:
    """Trace `model` (eval, and train mode unless disabled) and return its channel groups.

    `ignore`: glob patterns of module names whose channels must not be removed.
    `through_layernorm`: see `layer_rules.TraceOptions` (removals behind a LayerNorm are approximate).
    Raises UserError when the model cannot be traced or run on `input_shape`.
    """
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    generator = torch.Generator().manual_seed(0)
    example = torch.randn((2, *input_shape), generator=generator).to(device=device, dtype=dtype)
    options = TraceOptions(through_layernorm=through_layernorm)
    graph = _build(model, example, input_shape, ignore, train_mode, options)
    collapsed = _collapsed_grouped_convs(model, graph)
    if collapsed:
        # A grouped conv ties local input j of every conv group together; a norm over groups of
        # channels (GroupNorm, EvoNorm) ties the channels of each group: together they leave one
        # class. Removing whole conv groups instead is what such a layer allows.
        options = replace(options, whole_conv_groups=frozenset(collapsed))
        graph = _build(model, example, input_shape, ignore, train_mode, options)
    return graph


def _build(model: nn.Module, example: torch.Tensor, input_shape: Sequence[int], ignore: Sequence[str],
           train_mode: bool, options: TraceOptions) -> ChannelGraph:
    uf = _UnionFind()
    costs: dict[str, ModuleCost] = {}
    unfollowed: list[str] = []
    tracings = []
    for train in ((False, True) if train_mode else (False,)):
        try:
            tracings.append(_run_mode(model, example, train, uf, costs, unfollowed, options))
        except Exception as exc:
            what = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
            if not train:
                raise UserError(f"cannot trace the model on input {tuple(input_shape)}: {what}") from exc
            # e.g. detection models want targets in train mode: the eval graph is all there is
            unfollowed.append(f"the train-mode forward failed ({what}); modules used only in training are not followed")
    graph = _collect_groups(model, uf, costs, input_shape, ignore, unfollowed)
    graph.tracing = "recorded" if "recorded" in tracings else "fx"
    return graph


def _collapsed_grouped_convs(model: nn.Module, graph: ChannelGraph) -> set[str]:
    """Grouped convs whose inputs all ended in groups of a single channel class."""
    modules = dict(model.named_modules())
    inputs_free: dict[str, bool] = {}
    for g in graph.groups:
        for slots in g.classes:
            for name, kind, _ in slots:
                if kind == "in":
                    inputs_free[name] = inputs_free.get(name, False) or g.channels >= 2
    collapsed = set()
    for name, free in inputs_free.items():
        rule = rule_for(modules[name]) if name in modules else None
        if not free and rule is not None and rule.can_prune_whole_groups(modules[name]):
            collapsed.add(name)
    return collapsed


def _collect_groups(model: nn.Module, uf: _UnionFind, costs: dict[str, ModuleCost],
                    input_shape: Sequence[int], ignore: Sequence[str], unfollowed: list[str]) -> ChannelGraph:
    order = {name: i for i, (name, _) in enumerate(model.named_modules())}
    classes: dict[int, list[Slot]] = {}
    pins: dict[int, str] = {}
    approx: dict[int, str] = {}
    for sid, slot in enumerate(uf.slot_of):
        root = uf.find(sid)
        if slot is not None:
            classes.setdefault(root, []).append(slot)
        if sid in uf.pin_reason:
            pins.setdefault(root, uf.pin_reason[sid])
        if sid in uf.approx_reason:
            approx.setdefault(root, uf.approx_reason[sid])
    units = {r: s for r, s in classes.items() if any(k in PRODUCER_KINDS for _, k, _ in s)}

    # Layer-level groups: classes that share a producer module belong together.
    parent: dict[str, str] = {}

    def find(a: str) -> str:
        while parent.setdefault(a, a) != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a

    for slots in units.values():
        producers = [m for m, k, _ in slots if k in PRODUCER_KINDS]
        for p in producers[1:]:
            ra, rb = find(producers[0]), find(p)
            if ra != rb:
                parent[max(ra, rb, key=lambda n: order.get(n, 0))] = min(ra, rb, key=lambda n: order.get(n, 0))

    by_group: dict[str, list[int]] = {}
    for root, slots in units.items():
        first = next(m for m, k, _ in slots if k in PRODUCER_KINDS)
        by_group.setdefault(find(first), []).append(root)

    def class_key(root: int) -> tuple[int, int]:
        return min((order.get(m, 0), i) for m, k, i in units[root] if k in PRODUCER_KINDS)

    groups: list[ChannelGroup] = []
    for head in sorted(by_group, key=lambda n: order.get(n, 0)):
        roots = sorted(by_group[head], key=class_key)
        members = sorted({m for r in roots for m, _, _ in units[r]}, key=lambda n: order.get(n, 0))
        cls = [sorted(units[r], key=lambda s: (order.get(s[0], 0), s[1], s[2])) for r in roots]
        pinned = {i: pins[r] for i, r in enumerate(roots) if r in pins}
        for i, slots in enumerate(cls):
            if i not in pinned and all(k in PRODUCER_KINDS for _, k, _ in slots):
                # No layer and no output took these channels in the traced run: something dropped
                # them unseen (a loop over detections that ran zero times), so what uses them is unknown.
                pinned[i] = "its channels reach no layer and no model output in the traced run"
            if i not in pinned and any(fnmatch.fnmatchcase(m, pat) for m, k, _ in slots if k in PRODUCER_KINDS for pat in ignore):
                pinned[i] = "ignored by --ignore"
        approximate = {i: approx[r] for i, r in enumerate(roots) if r in approx}
        groups.append(ChannelGroup(id=len(groups), name=head, members=members, classes=cls, pinned=pinned,
                                   approximate=approximate))
    return ChannelGraph(groups=groups, costs=costs, input_shape=tuple(input_shape),
                        unfollowed=sorted(set(unfollowed)))


def match_ignored(graph_modules: Iterable[str], patterns: Sequence[str]) -> list[str]:
    """Patterns of `--ignore` that match no module (the CLI warns about them)."""
    names = list(graph_modules)
    return [p for p in patterns if not any(fnmatch.fnmatchcase(n, p) for n in names)]
