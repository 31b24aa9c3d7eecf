"""`l1` / `l2`: the norm of the filters that produce a channel (Li et al., 2017).

A channel with several producers (a residual stream) scores the mean of their filter norms, so
groups with many producers stay comparable with single-producer groups.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from ..graph import ChannelGraph
from .base import Batch, Criterion, Scores, per_class, producer_rows, register


class _NormCriterion(Criterion):
    p: int = 1

    def score(self, model: nn.Module, graph: ChannelGraph, data: Iterable[Batch] | None,
              device: torch.device, *, seed: int = 0, **options: Any) -> Scores:
        def class_score(slots: list) -> float:
            rows = producer_rows(model, slots)
            return sum(float(r.norm(p=self.p)) for _, r in rows) / max(len(rows), 1)

        return {g.id: per_class(g, class_score) for g in graph.prunable_groups()}


@register
class L1(_NormCriterion):
    name = "l1"
    summary = "L1 norm of the producing filters (weights only)"
    p = 1


@register
class L2(_NormCriterion):
    name = "l2"
    summary = "L2 norm of the producing filters (weights only)"
    p = 2
