"""Remove channels physically, mask them to zero, and prove the two agree.

A plan maps a group id to the class indices to remove. Surgery slices every member of those
classes in place, keeping module types and updating their shape attributes, so the result can be
saved, reloaded, re-traced and pruned again.
"""

from __future__ import annotations

import copy
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..errors import ChanpruneError, UserError
from .graph import ChannelGraph, Slot
from .layer_rules import LayerRule, rule_for

Plan = Mapping[int, Sequence[int]]  # group id -> class indices to remove


@dataclass
class VerifyResult:
    max_abs_diff: float
    tolerance: float
    passed: bool
    outputs_compared: int


def removals(graph: ChannelGraph, plan: Plan) -> dict[str, dict[str, set[int]]]:
    """Per module, per slot kind, the indices to remove."""
    out: dict[str, dict[str, set[int]]] = defaultdict(lambda: defaultdict(set))
    by_id = {g.id: g for g in graph.groups}
    for gid, indices in plan.items():
        group = by_id.get(gid)
        if group is None:
            raise UserError(f"the plan names channel group {gid}, which this model does not have")
        for ci in indices:
            if ci in group.pinned:
                raise UserError(f"group {group.name}: channel {ci} cannot be removed ({group.pinned[ci]})")
            if not 0 <= ci < group.channels:
                raise UserError(f"group {group.name} has {group.channels} channels; cannot remove index {ci}")
            slots: list[Slot] = group.classes[ci]
            for module, kind, index in slots:
                out[module][kind].add(index)
    return out


def _rule(name: str, module: nn.Module) -> LayerRule:
    rule = rule_for(module)
    if rule is None:
        raise ChanpruneError(f"internal: no layer rule for {type(module).__name__} ({name})")
    return rule


def prune_model(model: nn.Module, graph: ChannelGraph, plan: Plan) -> None:
    """Physically remove the planned channels from `model`, in place."""
    modules = dict(model.named_modules())
    drops = removals(graph, plan)
    # A plan may keep channels in a group yet empty one of its layers (the option-A stage chain can
    # rank all 16 stage-1 classes lowest): refuse before touching the model.
    for name, drop in drops.items():
        rule = _rule(name, modules[name])
        for kind in ("out", "dw"):
            width = rule.producer_width(modules[name], kind) if drop.get(kind) else None
            if width is not None and len(drop[kind]) >= width:
                raise UserError(f"the plan removes all {width} output channels of {name}; keep at least one "
                                "(the allocator's per-layer floor, --min-keep, does this)")
    for name, drop in drops.items():
        _rule(name, modules[name]).prune(modules[name], drop)


@torch.no_grad()
def mask_model(model: nn.Module, graph: ChannelGraph, plan: Plan) -> None:
    """Zero the planned channels in place: their producers' rows, norm entries and the consumers'
    input weights, so the masked model computes exactly what the pruned one does."""
    modules = dict(model.named_modules())
    for name, drop in removals(graph, plan).items():
        # Producers, norm entries *and* the consumers' inputs: a removed channel need not be zero
        # where it is consumed (sigmoid(0) = 0.5, an affine-free BatchNorm gives -mean/std).
        _rule(name, modules[name]).mask(modules[name], drop)


@torch.no_grad()
def zero_producers(model: nn.Module, graph: ChannelGraph, plan: Plan) -> None:
    """Zero the producer filters (weight rows and bias) of the planned channel classes, in place.

    Unlike `mask_model`, norms and the consumers' input weights are kept, so the zeroed filters
    still receive gradients and can recover (soft filter pruning)."""
    modules = dict(model.named_modules())
    for name, drop in removals(graph, plan).items():
        _rule(name, modules[name]).zero_producers(modules[name], drop)


def _flatten_outputs(value: Any) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, Mapping):
        return [t for v in value.values() for t in _flatten_outputs(v)]
    if isinstance(value, (tuple, list)):
        return [t for v in value for t in _flatten_outputs(v)]
    return []


@torch.no_grad()
def verify(original: nn.Module, graph: ChannelGraph, plan: Plan, pruned: nn.Module,
           input_shape: Sequence[int], *, batch_size: int = 2, seed: int = 0,
           rtol: float = 1e-5) -> VerifyResult:
    """Compare `pruned` with `original` masked by `plan`, in float64 on random inputs (eval mode).

    Float64 makes the tolerance meaningful: a correct surgery differs only by rounding (~1e-12),
    while any structural mistake shows up at the scale of the activations.
    """
    reference = copy.deepcopy(original).double().eval()
    mask_model(reference, graph, plan)
    candidate = copy.deepcopy(pruned).double().eval()
    device = next((p.device for p in reference.parameters()), torch.device("cpu"))
    x = torch.randn((batch_size, *input_shape), generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(device)
    ref_out = _flatten_outputs(reference(x))
    got_out = _flatten_outputs(candidate(x))
    if len(ref_out) != len(got_out) or any(a.shape != b.shape for a, b in zip(ref_out, got_out)):
        return VerifyResult(float("inf"), 0.0, False, len(ref_out))
    diff = max((float((a - b).abs().max()) for a, b in zip(ref_out, got_out) if a.numel()), default=0.0)
    scale = max((float(a.abs().max()) for a in ref_out if a.numel()), default=0.0)
    tolerance = rtol * max(1.0, scale)
    return VerifyResult(diff, tolerance, diff <= tolerance, len(ref_out))
