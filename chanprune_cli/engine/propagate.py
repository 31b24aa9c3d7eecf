"""Channel propagation: one traced graph walked node by node, channel ids replayed on labels.

Placeholders and parameters carry no channel ids; a leaf module's call is labelled by its layer
rule (`layer_rules`), a torch function's or tensor method's call by its op rule (`op_rules`);
whatever reaches the model's outputs is pinned there. A call no rule follows, or whose rule
fails, pins the ids it touches with a reason naming it: the engine may be conservative, never
silently wrong. The rules see a call through `_ModuleCall` / `_OpCall` (the `ModuleCall` and
`OpCall` protocols).
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Sequence
from functools import cached_property
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from .labels import UnionFind, along, broadcast_vec, is_tracked, varying_axes
from .layer_rules import UNTRACKED, ModuleCost, Slot, TraceOptions, rule_for
from .op_rules import op_rule_for
from .recording import Shape
from .structural_ops import replay_module


class Propagator:
    """Walks one traced graph, labelling every node's output (`labels`)."""

    def __init__(self, graph: fx.Graph, modules: dict[str, nn.Module], values: dict[fx.Node, Any], uf: UnionFind,
                 costs: dict[str, ModuleCost], unfollowed: list[str], options: TraceOptions) -> None:
        self.options = options
        self.graph = graph
        self.modules = modules
        self.values = values
        self.uf = uf
        self.costs = costs
        self.unfollowed = unfollowed
        self.labels: dict[fx.Node, Any] = {}

    def run(self) -> None:
        for node in self.graph.nodes:
            if node.op in ("placeholder", "get_attr"):
                self.labels[node] = None
            elif node.op == "output":
                for t in self.tensor_inputs(node):
                    self.uf.pin(t, "model output")
            else:
                try:
                    self._call_module(node) if node.op == "call_module" else self._call_op(node)
                except Exception as exc:  # noqa: BLE001  (an op the labels cannot replay: keep its channels)
                    self.pin_inputs(node, f"cannot follow {node.name}: {type(exc).__name__}")
                    self.labels[node] = None

    def _call_module(self, node: fx.Node) -> None:
        """A leaf module call: its layer rule labels the output (engine/layer_rules.py)."""
        name = str(node.target)
        m = self.modules[name]
        call = _ModuleCall(self, node, name, m)
        rule = rule_for(m)
        if rule is None or not rule.trace(call):
            self.pin_inputs(node, f"unsupported module {type(m).__name__} ({name})")
            self.labels[node] = None

    def _call_op(self, node: fx.Node) -> None:
        """A torch function or tensor method call: its op rule labels the output (engine/op_rules.py)."""
        first = node.args[0] if node.args else None
        container = self.labels.get(first) if isinstance(first, fx.Node) else None
        if node.target is operator.getitem and isinstance(container, tuple):
            # one output of a call with several (split, chunk, a module returning a tuple)
            self.labels[node] = container[self.concrete(node.args[1], for_labels=False)]
            return
        call = _OpCall(self, node)
        if not call.tracked:
            self.labels[node] = None
            return
        rule = op_rule_for(node.target)
        if rule is None or not rule(call):
            self.pin_inputs(node, f"unsupported op {call.op} ({node.name})")
            self.labels[node] = None

    # -- what the calls read and write ---------------------------------------------------------
    def label(self, arg: Any) -> torch.Tensor | None:
        """Label tensor of a node argument, or None when it is not a tensor."""
        if isinstance(arg, fx.Node):
            lab = self.labels.get(arg)
            if isinstance(lab, torch.Tensor):
                return lab
            meta = self.values.get(arg)
            if isinstance(meta, Shape):
                return torch.full((1,) if meta.shape else (), UNTRACKED, dtype=torch.long).expand(meta.shape)
        return None

    def concrete(self, arg: Any, for_labels: bool) -> Any:
        """`arg` with every node replaced by its value in the traced run, or (`for_labels`) by its
        label where it is a tensor."""
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

    def tensor_inputs(self, node: fx.Node, skip_first: bool = False) -> list[torch.Tensor]:
        out: list[torch.Tensor] = []

        def collect(a: fx.Node) -> None:
            lab = self.labels.get(a)
            if isinstance(lab, tuple):
                out.extend(t for t in lab if isinstance(t, torch.Tensor))
            elif (t := self.label(a)) is not None:
                out.append(t)

        fx.node.map_arg((node.args[1:] if skip_first else node.args, node.kwargs), collect)
        return out

    def pin_inputs(self, node: fx.Node, reason: str) -> None:
        tracked = [t for t in self.tensor_inputs(node) if is_tracked(t)]
        if tracked:
            self.unfollowed.append(reason)
            for t in tracked:
                self.uf.pin(t, reason)  # perf: pin() compacts and skips untracked ids

    def cannot_follow(self, ids: torch.Tensor | Sequence[int], reason: str) -> None:
        self.unfollowed.append(reason)
        self.uf.pin(ids, reason)

    def channel_vector(self, lab: torch.Tensor, axis: int, node: fx.Node, what: str) -> torch.Tensor:
        """The ids along `axis`; pins and returns untracked ids when they also vary elsewhere."""
        axis = axis % lab.dim()
        if not lab.numel() and lab.shape[axis]:
            # An empty view (no rows in the example: a detector's stage with no boxes) still holds
            # its channels in its storage; a storage that does not fails here, and the op is pinned.
            return torch.as_strided(lab, (lab.shape[axis],), (lab.stride(axis),), lab.storage_offset())
        vec = along(lab, axis)
        if any(a != axis for a in varying_axes(lab)):
            self.cannot_follow(lab, f"channels mixed with other axes before {what} ({node.name})")
            return torch.full_like(vec, UNTRACKED)
        return vec

    def out_shape(self, node: fx.Node) -> tuple[int, ...] | None:
        meta = self.values.get(node)
        return meta.shape if isinstance(meta, Shape) else None

    def running_module(self, node: fx.Node) -> tuple[str, dict[str, Any]] | None:
        """The module whose forward runs `node` (its nn_module_stack meta) and its plain attributes."""
        # fx and recordings both note it (none: the root). Sizes read from tensors are nodes in
        # both, so a literal size that matches an attribute is taken for that attribute.
        stack = node.meta.get("nn_module_stack")
        path = list(stack.values())[-1][0] if stack else ""
        module = self.modules.get(path) if isinstance(path, str) else None
        if module is None:
            return None
        return path, {k: v for k, v in vars(module).items() if not k.startswith("_")}


class _NodeCall:
    """What module and op calls share: the output, channel vectors, pins."""

    def __init__(self, propagator: Propagator, node: fx.Node, what: str) -> None:
        self._p = propagator
        self._what = what  # names the call in "channels mixed with other axes before WHAT"
        self.node = node
        self.shape = propagator.out_shape(node)

    def set_output(self, label: Any) -> None:
        self._p.labels[self.node] = label

    def channel_vector(self, label: torch.Tensor, axis: int, what: str | None = None) -> torch.Tensor:
        return self._p.channel_vector(label, axis, self.node, self._what if what is None else what)

    def varying_axes(self, label: torch.Tensor) -> list[int]:
        return varying_axes(label)

    def broadcast(self, vec: torch.Tensor, axis: int) -> torch.Tensor:
        assert self.shape is not None
        return broadcast_vec(vec, axis, self.shape)

    def pin(self, ids: torch.Tensor | Sequence[int], reason: str) -> None:
        self._p.uf.pin(ids, reason)

    def pin_inputs(self, reason: str) -> None:
        self._p.pin_inputs(self.node, reason)


class _ModuleCall(_NodeCall):
    """One leaf-module call as its layer rule sees it (the `layer_rules.ModuleCall` protocol)."""

    def __init__(self, propagator: Propagator, node: fx.Node, name: str, module: nn.Module) -> None:
        super().__init__(propagator, node, name)
        self.name = name
        self.module = module
        self.x = propagator.label(node.args[0]) if node.args else None
        self.options = propagator.options

    def new_slot(self, kind: str, index: int) -> int:
        return self._p.uf.new((self.name, kind, index))

    def new_slots(self, kind: str, count: int) -> torch.Tensor:
        return self._p.uf.fresh(self.name, kind, count)

    def link(self, slot_id: int, label: int) -> None:
        self._p.uf.link(slot_id, label)

    def pin_other_inputs(self, reason: str) -> None:
        for t in self._p.tensor_inputs(self.node, skip_first=True):
            self._p.uf.pin(t, reason)

    def approximate(self, ids: torch.Tensor | Sequence[int], reason: str) -> None:
        self._p.uf.approximate(ids.tolist() if isinstance(ids, torch.Tensor) else ids, reason)

    def add_cost(self, cost: ModuleCost) -> None:
        self._p.costs[self.name] = cost

    def structural(self, fn: Callable[..., Any], literal_sizes: bool) -> None:
        replay_module(_OpCall(self._p, self.node), fn, literal_sizes, self.module)


class _OpCall(_NodeCall):
    """One torch function or tensor method call as its op rule sees it (the `op_rules.OpCall`
    protocol)."""

    def __init__(self, propagator: Propagator, node: fx.Node) -> None:
        target = node.target
        op = target if isinstance(target, str) else getattr(target, "__name__", str(target))
        super().__init__(propagator, node, op)
        self.target = target
        self.op = op
        self.modules = propagator.modules

    @cached_property
    def inputs(self) -> list[torch.Tensor]:
        return self._p.tensor_inputs(self.node)

    @cached_property
    def tracked(self) -> list[torch.Tensor]:
        return [t for t in self.inputs if is_tracked(t)]

    def label(self, arg: Any) -> torch.Tensor | None:
        return self._p.label(arg)

    def value(self, arg: Any) -> Any:
        return self._p.concrete(arg, for_labels=False)

    def argument(self, index: int, keyword: str, default: Any = None) -> Any:
        args = self.node.args
        return self.value(self.node.kwargs.get(keyword, args[index] if len(args) > index else default))

    def label_args(self) -> tuple[Any, Any]:
        return self._p.concrete(self.node.args, for_labels=True), self._p.concrete(self.node.kwargs, for_labels=True)

    def shape_of(self, arg: Any) -> tuple[int, ...] | None:
        return self._p.out_shape(arg) if isinstance(arg, fx.Node) else None

    def relabel(self, node: fx.Node, label: torch.Tensor) -> None:
        self._p.labels[node] = label

    def union(self, a: int, b: int) -> None:
        self._p.uf.union(a, b)

    def union_pairs(self, a: torch.Tensor, b: torch.Tensor) -> None:
        self._p.uf.union_pairs(a, b)

    def link_slot(self, slot: Slot, label: int) -> None:
        self._p.uf.link(self._p.uf.new(slot), label)

    def cannot_follow(self, ids: torch.Tensor | Sequence[int], reason: str) -> None:
        self._p.cannot_follow(ids, reason)

    def running_module(self) -> tuple[str, dict[str, Any]] | None:
        return self._p.running_module(self.node)

    def replay(self, fn: Callable[..., Any] | None = None, args: Any = None, kwargs: Any = None) -> Any:
        """The op (or `fn`) run on the labels of the arguments (`label_args`, unless given). An op
        that fails on labels is not followed: its inputs are pinned, its output untracked (None)."""
        if args is None or kwargs is None:
            label_args, label_kwargs = self.label_args()
            args = label_args if args is None else args
            kwargs = label_kwargs if kwargs is None else kwargs
        if fn is None:
            target = self.target
            fn = (lambda *a, **k: getattr(a[0], target)(*a[1:], **k)) if isinstance(target, str) else target
        try:
            return fn(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001  (the op behaves differently on labels: cannot follow it)
            self.pin_inputs(f"cannot follow {self.node.name}: {type(exc).__name__}")
            self.set_output(None)
            return None
