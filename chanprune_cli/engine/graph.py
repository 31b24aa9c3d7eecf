"""Trace a model and find its groups of coupled channels: what `build_graph` returns.

How it works. The model is traced with torch.fx (in eval *and* train mode, so auxiliary heads
count) and run once on a random input to learn every tensor's shape and every Python value (sizes,
split points): `tracing`. Then each tensor is given a *label tensor* of the same shape whose
elements are channel ids: every producer (conv/linear output), consumer input, norm entry and pad
position is a "slot" with an id in a union-find (`labels`). Module calls are followed by their
layer rules (`layer_rules`), functional ops by their op rules (`op_rules`: ops that mix channels
the same way for every element, such as add, mul, cat, split, view, permute, pad, pooling, are
replayed on the labels themselves), and ids that must be removed together are unioned
(`propagate`). A *class* is a union-find set: the slots that stand or fall together. A *group*
is a set of classes that share producer layers; it gets one score vector (collected here).

Anything the engine cannot follow pins the ids it touches, with a reason naming the op: a pinned
class is never removed, so the engine may be conservative but never silently wrong. The surgery
module's equivalence check then proves each pruned model against the masked original.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace

import torch
from torch import nn

from ..errors import UserError
from .labels import UnionFind
from .layer_rules import PRODUCER_KINDS, ModuleCost, Slot, TraceOptions, rule_for
from .tracing import propagate_mode

__all__ = ["ChannelGraph", "ChannelGroup", "Slot", "build_graph", "match_ignored"]


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
    uf = UnionFind()
    costs: dict[str, ModuleCost] = {}
    unfollowed: list[str] = []
    tracings = []
    for train in ((False, True) if train_mode else (False,)):
        try:
            tracings.append(propagate_mode(model, example, train, uf, costs, unfollowed, options))
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


def _collect_groups(model: nn.Module, uf: UnionFind, costs: dict[str, ModuleCost],
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
