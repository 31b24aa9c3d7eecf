"""One pruning round as a plain function: scores → plan → surgery → verification → report data."""

from __future__ import annotations

import copy
import dataclasses
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
from ..measure import count_params
from .scoring import ResolvedCriterion, recorded_criterion
from .workload import CountedWork, count_work, fit_costs, on_reference_workload


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
    """How the MACs of a model whose work depends on its input compare: `before` and `after` count
    both models on the original's workload (`original`, see `prune.workload`); `own` counts the
    pruned model on its own (its own proposals and detections), and `changed` names the layers
    whose work differs there (layer, own MACs / MACs on the original's workload)."""

    original: CountedWork
    changed: list[tuple[str, float]]
    own: CountedWork


def snapshot(model: nn.Module, work: CountedWork) -> tuple[dict[str, int], dict[str, dict[str, Any]]]:
    """Totals (params, MACs) and the conv/linear layers with channel counts, params and MACs, the
    MACs as `work` counted them."""
    rows = {}
    for name, m in model.named_modules():
        shape = layer_shape(m)  # the layer rules say which modules are conv/linear layers
        if shape is not None and shape.kind in ("conv", "linear"):
            rows[name] = {"name": name, "type": type(m).__name__, "in": shape.in_channels, "out": shape.out_channels,
                          "groups": shape.groups, "params": count_params(m), "macs": work.macs.get(name, 0)}
    return {"params": count_params(model), "macs": work.total}, rows


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
          check: bool = True, rescale: bool = True, latency: LatencyBudget | None = None,
          work: CountedWork | None = None) -> PruneOutcome:
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
    `work`: the original's MACs on the example input (`workload.count_work`; counted here when not
    given); `graph`'s costs are fitted to it (`workload.fit_costs`) before allocating. The MACs
    before and after compare on that workload (`PruneOutcome.workload` says how, where it matters).
    """
    if not isinstance(criterion, ResolvedCriterion):
        criterion = recorded_criterion(criterion, criterion_options)
    refuse_nonfinite(model, "prune")
    normalize = criterion.normalize_mode(options.normalize)
    if work is None:
        work = count_work(model, input_shape)
    fit_costs(graph, work)
    allocation = allocate(graph, scores, dataclasses.replace(options, normalize=normalize), removed=removed,
                          latency=latency)
    before, before_layers = snapshot(model, work)
    scales = channel_scales(scores) if rescale else {}
    source = model
    if scales:
        source = copy.deepcopy(model)
        rescale_channels(source, graph, scales)
    pruned, result = pruned_copy(source, graph, allocation.plan, input_shape, check=check)
    approximations = graph.approximations(allocation.plan)
    after, after_layers, workload = _after(model, work, pruned, input_shape)
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
    return PruneOutcome(pruned, allocation, result, before, after, layers, record, approximations, workload)


def _after(original: nn.Module, work: CountedWork, pruned: nn.Module, input_shape: Sequence[int]
           ) -> tuple[dict[str, int], dict[str, dict[str, Any]], Workload | None]:
    """The pruned model's totals and layers; counted on the original's workload (and the `Workload`
    said) when that differs from its own or the model is a two-stage detector."""
    own = count_work(pruned, input_shape, nominal=False)
    matched = on_reference_workload(original, work, pruned, own.macs)
    if not (matched.changed or work.detector or work.nominal is not None):
        return snapshot(pruned, own) + (None,)
    on_original = CountedWork({**own.macs, **{k: int(round(v)) for k, v in matched.leaves.items()}, "": matched.total})
    totals, rows = snapshot(pruned, on_original)
    return totals, rows, Workload(work, matched.changed, own)
