"""Iterative pruning (`prune --rounds N`): reach a MACs or latency target in N rounds, rescoring in between.

Round k chooses channels until k/N of the target is reached; what earlier rounds chose stays
chosen, and the next round scores a copy of the model with those channels masked
(`surgery.mask_model`: the copy computes what the pruned model would), after `refresh` (BatchNorm
re-estimation on the calibration data) when given. Each group's scores are normalised over the
channels still alive, so a layer that lost its weakest channels ranks the rest lower — the dynamics
of Torch-Pruning's iterative steps. Surgery happens once, after the last round (`pruning.prune`
with `removed=`): floors (--min-keep) hold for the original widths, and the result is verified
against the original model, masked.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from ..engine.allocate import AllocationOptions, allocate
from ..engine.graph import ChannelGraph
from ..engine.latency import LatencyBudget
from ..engine.surgery import mask_model

Scores = Mapping[int, torch.Tensor]


def score_in_rounds(model: nn.Module, graph: ChannelGraph, score: Callable[[nn.Module], Scores],
                    options: AllocationOptions, *, refresh: Callable[[nn.Module], Any] | None = None,
                    latency: LatencyBudget | None = None) -> tuple[Scores, dict[int, list[int]]]:
    """Rounds 1..N−1 of iterative pruning (N = `options.rounds`): the scores for the last round and
    the channels chosen before it. `score(model)` scores a model with the graph's module names;
    round k allocates as `options` say, to k/N of their `target_flops`, or (`target_latency`) to
    k/N of the way from the unpruned model's predicted latency to the `latency` budget. With one
    round: `score(model)`, {}."""
    removed: dict[int, list[int]] = {}
    scores = score(model)
    for k in range(1, options.rounds):
        if options.target_latency is not None:
            step = dataclasses.replace(options, rounds=1)
            budget = None if latency is None else dataclasses.replace(
                latency, ms=latency.model.predict({}) - (latency.model.predict({}) - latency.ms) * k / options.rounds)
            removed = allocate(graph, scores, step, removed=removed, latency=budget).plan
        else:
            assert options.target_flops is not None  # AllocationOptions: rounds need a MACs or latency target
            step = dataclasses.replace(options, target_flops=options.target_flops * k / options.rounds, rounds=1)
            removed = allocate(graph, scores, step, removed=removed).plan
        masked = copy.deepcopy(model)
        mask_model(masked, graph, removed)
        if refresh is not None:
            refresh(masked)
        scores = score(masked.eval())
    return scores, removed
