"""One pruning round as a plain function: scores → plan → surgery → verification → report data."""

from __future__ import annotations

import copy
import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..checkpoint import refuse_nonfinite
from ..engine.allocate import Allocation, AllocationOptions, allocate
from ..engine.graph import ChannelGraph
from ..engine.latency import LatencyBudget
from ..engine.layer_rules import layer_shape
from ..engine.points import rescale_channels
from ..engine.scores import channel_scales
from ..engine.surgery import Plan, VerifyResult, prune_model, verify
from ..errors import ChanpruneError
from ..measure import count_params, per_module_macs
from .scoring import ResolvedCriterion, recorded_criterion


@dataclass
class PruneOutcome:
    model: nn.Module
    allocation: Allocation
    verify: VerifyResult | None
    before: dict[str, int]
    after: dict[str, int]
    layers: list[dict[str, Any]]
    plan_record: dict[str, Any]
    approximations: list[str] = field(default_factory=list)  # why the result is not exact (measured, not proven)
    workload: Workload | None = None  # set when the MACs before and after count different workloads


@dataclass
class Workload:
    """The conv/linear layers whose MACs after pruning are not what their kept channels explain:
    the model ran them on a different number of positions (a detector's region proposals depend
    on its weights), so `after["macs"]` counts another workload than `before["macs"]`.
    `macs_same_workload`: the pruned model's MACs on the original's workload (each such layer's
    MACs before, scaled by its kept channels)."""

    changed: list[tuple[str, float]]  # (layer, measured / expected MACs), most changed first
    macs_same_workload: int


def snapshot(model: nn.Module, input_shape: Sequence[int]) -> tuple[dict[str, int], dict[str, dict[str, Any]]]:
    """Totals (params, MACs) and the conv/linear layers with channel counts, params and MACs."""
    macs = per_module_macs(model, input_shape)
    rows = {}
    for name, m in model.named_modules():
        shape = layer_shape(m)  # the layer rules say which modules are conv/linear layers
        if shape is not None and shape.kind in ("conv", "linear"):
            rows[name] = {"name": name, "type": type(m).__name__, "in": shape.in_channels, "out": shape.out_channels,
                          "groups": shape.groups, "params": count_params(m), "macs": macs.get(name, 0)}
    return {"params": count_params(model), "macs": sum(macs.values())}, rows


def plan_record(graph: ChannelGraph, allocation: Allocation, criterion: str) -> dict[str, Any]:
    """The plan as stored in chanprune checkpoints: kept class indices per group."""
    groups = []
    for g in graph.groups:
        removed = set(allocation.plan.get(g.id, []))
        if removed:
            groups.append({"group": g.name, "channels": g.channels,
                           "kept": [i for i in range(g.channels) if i not in removed],
                           "members": g.members})
    return {"criterion": criterion, "requested": allocation.requested, "groups": groups}


def pruned_copy(model: nn.Module, graph: ChannelGraph, plan: Plan, input_shape: Sequence[int], *, check: bool = True,
                schedule: str | None = None) -> tuple[nn.Module, VerifyResult | None]:
    """A deep copy of `model` pruned by `plan`, verified against `model` masked by the same plan
    (`engine.surgery.verify`; `check=False` skips that and returns no result); `model` is left
    untouched.

    Raises ChanpruneError when the copy does not compute the masked model's function, unless the
    plan removes approximate classes (`ChannelGraph.approximations`: then the result measures the
    deviation). `schedule` names the training-time schedule that pruned, in the error; without it
    the error is `chanprune prune`'s, which then writes nothing.
    """
    pruned = copy.deepcopy(model)
    prune_model(pruned, graph, plan)
    result = verify(model, graph, plan, pruned, input_shape) if check else None
    if result is not None and not result.passed and (result.failure or not graph.approximations(plan)):
        where = f" (first at layer {result.worst_layer})" if result.worst_layer else ""
        who, outcome = (f"{schedule}: ", "") if schedule else ("", "; nothing was written")
        what = (f"the pruned model cannot run: {result.failure} in {result.worst_layer}" if result.failure else
                f"the pruned model differs from the masked original by {result.max_abs_diff:.3g} "
                f"(tolerance {result.tolerance:.3g}){where}")
        raise ChanpruneError(f"{who}verification failed: {what}{outcome}. Please report this model; --ignore the "
                             "layers involved to work around it")
    return pruned, result


def normalize_mode(choice: str, criterion: str, options: Mapping[str, Any] | None = None) -> str:
    """`--normalize` for scores made by the criterion named `criterion` with `options` (see
    `ResolvedCriterion.normalize_mode`)."""
    return recorded_criterion(criterion, options).normalize_mode(choice)


def prune(model: nn.Module, graph: ChannelGraph, scores: Mapping[int, torch.Tensor], input_shape: Sequence[int], *,
          criterion: str | ResolvedCriterion, options: AllocationOptions,
          criterion_options: Mapping[str, Any] | None = None, removed: Mapping[int, Sequence[int]] | None = None,
          check: bool = True, rescale: bool = True, latency: LatencyBudget | None = None) -> PruneOutcome:
    """Prune a copy of `model` by `scores`, allocated as `options` say; the original is left untouched.

    Scores that carry per-channel factors (White-Box's BN rescale, `criteria.base.channel_scales`)
    have them multiplied onto every channel first (`rescale=False` skips that); the pruned model is
    then verified against that rescaled, masked original.

    Raises UserError for impossible requests or non-finite weights, and ChanpruneError when the
    pruned model does not compute the same function as the masked original.

    `criterion` made the scores: resolved, or a name with the `criterion_options` the scores were
    made with; it settles `options.normalize` "auto" (`ResolvedCriterion.normalize_mode`).
    `removed` are channels chosen by earlier rounds (`rounds.score_in_rounds`), kept in the plan.
    `latency`: the predicted milliseconds an `options.target_latency` plan must fit (`chanprune_cli.latency`).
    """
    if not isinstance(criterion, ResolvedCriterion):
        criterion = recorded_criterion(criterion, criterion_options)
    refuse_nonfinite(model, "prune")
    normalize = criterion.normalize_mode(options.normalize)
    allocation = allocate(graph, scores, dataclasses.replace(options, normalize=normalize), removed=removed,
                          latency=latency)
    before, before_layers = snapshot(model, input_shape)
    scales = channel_scales(scores) if rescale else {}
    source = model
    if scales:
        source = copy.deepcopy(model)
        rescale_channels(source, graph, scales)
    pruned, result = pruned_copy(source, graph, allocation.plan, input_shape, check=check)
    approximations = graph.approximations(allocation.plan)
    after, after_layers = snapshot(pruned, input_shape)
    layers = [{"name": n, "type": b["type"], "in_before": b["in"], "out_before": b["out"],
               "in_after": after_layers[n]["in"], "out_after": after_layers[n]["out"],
               "params_before": b["params"], "params_after": after_layers[n]["params"],
               "macs_before": b["macs"], "macs_after": after_layers[n]["macs"]}
              for n, b in before_layers.items() if n in after_layers]
    record = plan_record(graph, allocation, criterion.name)
    if scales:
        record["channel_rescale"] = True
    if approximations:
        record["approximate"] = approximations
    return PruneOutcome(pruned, allocation, result, before, after, layers, record, approximations,
                        workload_check(before, before_layers, after_layers))


def workload_check(before: Mapping[str, int], before_layers: Mapping[str, Mapping[str, Any]],
                   after_layers: Mapping[str, Mapping[str, Any]]) -> Workload | None:
    """None when every conv/linear layer's MACs changed exactly as its kept channels say (removing
    channels leaves spatial sizes alone); else the layers that did not (see `Workload`)."""
    changed, excess = [], 0
    for name, b in before_layers.items():
        a = after_layers.get(name)
        if a is None or not b["macs"] or not (b["in"] and b["out"] and a["in"] and a["out"]):
            continue
        expected = b["macs"] * (a["out"] * a["in"] / a["groups"]) / (b["out"] * b["in"] / b["groups"])
        excess += b["macs"] - expected
        if abs(a["macs"] - expected) > 0.01 * expected + 1:
            changed.append((name, a["macs"] / expected))
    if not changed:
        return None
    changed.sort(key=lambda item: -abs(math.log(max(item[1], 1e-12))))
    return Workload(changed, int(round(before["macs"] - excess)))
