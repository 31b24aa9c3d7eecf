"""Where each channel class takes its final value: the hook points criteria gate and capture.

A *hook point* is a module output where the channels of one group take their final value: the
output of the BatchNorm that directly follows a producer (conv / linear / depthwise conv) when the
class has a `norm` slot on that BatchNorm, else the producer's own output; in addition every other
norm module holding the class (a pre-activation BatchNorm as in DenseNet, InstanceNorm, a
GroupNorm group), since a norm turns a zero channel into a constant one while pruning removes it.
Which BatchNorm follows which producer is found by one probe forward (eval mode, no grad) on a
random input of `graph.input_shape`; the same probe records the execution order that sorts the points.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..errors import UserError
from .graph import ChannelGraph, ChannelGroup
from .layer_rules import PRODUCER_KINDS, WIDTH_KINDS, LayerRule, rule_for


@dataclass
class HookPoint:
    module: str
    axis: int                 # channel axis of the module output: 1, or -1 for Linear
    channels: torch.Tensor    # long [k]: output channels of the module that belong to the group
    classes: torch.Tensor     # long [k]: class index (in the group) of each of those channels
    order: int                # position of the module in model.named_modules()
    width: int = 0            # channels of the module output
    full_map: torch.Tensor = field(default_factory=lambda: torch.empty(0, dtype=torch.long))  # [width]: class or n


def _rule(module: nn.Module) -> LayerRule:
    rule = rule_for(module)
    if rule is None:
        raise UserError(f"cannot gate module of type {type(module).__name__}")
    return rule


def producer_channels(module: nn.Module, kind: str, index: int) -> list[int]:
    """Output channels of `module` that a producer slot (kind out/dw, local index) stands for."""
    return _rule(module).output_channels(module, kind, index)


def _gates_channels(module: nn.Module) -> bool:
    rule = rule_for(module)
    return rule is not None and rule.gates_channels


def _folds_producer(module: nn.Module) -> bool:
    rule = rule_for(module)
    return rule is not None and rule.folds_producer


def probe(model: nn.Module, graph: ChannelGraph, producers: set[str]) -> tuple[dict[str, str], dict[str, int]]:
    """One forward (eval, no grad) on a random input of `graph.input_shape`.

    Returns (pairs, order): producer name -> the BatchNorm whose input *is* the producer's output,
    and module name -> position in execution order (first call) of every producer and norm.
    """
    modules = dict(model.named_modules())
    outputs: dict[int, tuple[str, torch.Tensor]] = {}
    pairs: dict[str, str] = {}
    order: dict[str, int] = {}
    handles = []

    def out_hook(name: str) -> Callable[..., None]:
        def hook(m: nn.Module, inp: Any, out: Any) -> None:
            order.setdefault(name, len(order))
            if isinstance(out, torch.Tensor) and name in producers:
                outputs[id(out)] = (name, out)  # keep the tensor alive so ids are not reused
        return hook

    def bn_hook(name: str) -> Callable[..., None]:
        def hook(m: nn.Module, inp: Any) -> None:
            if inp and isinstance(inp[0], torch.Tensor) and id(inp[0]) in outputs:
                src, tensor = outputs[id(inp[0])]
                if tensor is inp[0]:
                    pairs.setdefault(src, name)
        return hook

    for name, m in modules.items():
        if name in producers or _gates_channels(m):
            handles.append(m.register_forward_hook(out_hook(name)))
        if _folds_producer(m):
            handles.append(m.register_forward_pre_hook(bn_hook(name)))
    param = next(model.parameters(), None)
    dev = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    example = torch.randn((2, *graph.input_shape), generator=torch.Generator().manual_seed(0)).to(dev, dtype)
    modes = [(m, m.training) for m in model.modules()]
    try:
        model.eval()
        with torch.no_grad():
            model(example)
    except Exception:  # noqa: BLE001 -- the probe only refines where to gate: producers (+ norms) alone are still exact
        pairs.clear()
        order.clear()
    finally:
        for h in handles:
            h.remove()
        for m, mode in modes:
            m.training = mode
    return pairs, order


def find_bn_pairs(model: nn.Module, graph: ChannelGraph, producers: set[str]) -> dict[str, str]:
    """producer name -> name of the BatchNorm that takes the producer's output directly."""
    return probe(model, graph, producers)[0]


def build_points(model: nn.Module, graph: ChannelGraph, groups: list[ChannelGroup] | None = None) -> dict[int, list[HookPoint]]:
    """Hook points of every (prunable) group, sorted by execution order (module order as fallback).

    A class is gated at: every norm module holding it (BatchNorm / InstanceNorm `norm` slots,
    GroupNorm `gnorm` groups), because a norm re-creates a constant channel from a zero input
    (a pre-activation BatchNorm in DenseNet, say) while pruning removes its entries too; and every
    producer, except one whose output goes straight into a BatchNorm holding the class (that
    BatchNorm's output is the same channel, final).
    """
    groups = graph.prunable_groups() if groups is None else groups
    modules = dict(model.named_modules())
    registration = {name: i for i, name in enumerate(modules)}
    producers = {m for g in groups for slots in g.classes for m, k, _ in slots if k in PRODUCER_KINDS}
    pairs, executed = probe(model, graph, producers)
    order = {name: (executed.get(name, len(executed)), registration[name]) for name in modules}
    points: dict[int, list[HookPoint]] = {}
    for g in groups:
        # modules whose per-channel entries (norm, gnorm, ...) hold classes of the group
        norms_in_group = {m for slots in g.classes for m, k, _ in slots
                          if k not in WIDTH_KINDS and _gates_channels(modules[m])}
        per_module: dict[str, dict[int, int]] = {}  # module -> {output channel: class}
        for ci, slots in enumerate(g.classes):
            for name, kind, index in slots:
                m = modules[name]
                if kind in PRODUCER_KINDS:
                    if pairs.get(name) in norms_in_group:
                        continue  # gated at the BatchNorm's output instead
                    for ch in producer_channels(m, kind, index):
                        per_module.setdefault(name, {})[ch] = ci
                elif kind != "in" and name in norms_in_group:
                    for ch in _rule(m).output_channels(m, kind, index):
                        per_module.setdefault(name, {})[ch] = ci
        pts = []
        for name, mapping in per_module.items():
            m = modules[name]
            rule = _rule(m)
            width = rule.output_width(m)
            chans = sorted(mapping)
            full = torch.full((width,), g.channels, dtype=torch.long)
            full[chans] = torch.tensor([mapping[c] for c in chans], dtype=torch.long)
            pts.append(HookPoint(module=name, axis=rule.output_axis(m),
                                 channels=torch.tensor(chans, dtype=torch.long),
                                 classes=torch.tensor([mapping[c] for c in chans], dtype=torch.long),
                                 order=order[name][0] * (len(modules) + 1) + order[name][1], width=width, full_map=full))
        points[g.id] = sorted(pts, key=lambda p: p.order)
    return points


@torch.no_grad()
def rescale_channels(model: nn.Module, graph: ChannelGraph, scales: Mapping[int, torch.Tensor]) -> None:
    """Multiply every channel class c of each group in `scales` by scales[gid][c] where it takes
    its final value: the affine parameters of its BatchNorm (or other norm), else the producer's
    weight rows and bias; the points are those the data-driven criteria gate (`build_points`),
    so the result computes what the model gated by `scales` computes."""
    groups = [g for g in graph.prunable_groups() if g.id in scales]
    modules = dict(model.named_modules())
    for gid, pts in build_points(model, graph, groups).items():
        factor = scales[gid].detach().double()
        for pt in pts:
            scale_outputs(modules[pt.module], pt.channels, factor[pt.classes])


def scale_outputs(module: nn.Module, channels: torch.Tensor, factors: torch.Tensor) -> None:
    """Multiply output `channels` of `module` by `factors` where they take their value (its layer
    rule decides: a norm's affine parameters, a producer's weight rows and bias)."""
    _rule(module).scale_outputs(module, channels, factors)
