"""`fpgm`: filter pruning via geometric median (He et al., CVPR 2019).

Filters close to the geometric median of their layer are the most replaceable. As in the paper's
code, a filter's score is the sum of its Euclidean distances to the other filters of the layer;
the lowest sums are removed. Multi-producer channels average over their producers.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from ..engine.graph import ChannelGraph
from .base import Batch, Criterion, Scores, producer_rows, register


@register
class FPGM(Criterion):
    name = "fpgm"
    summary = "distance to the layer's geometric median (weights only)"

    def score(self, model: nn.Module, graph: ChannelGraph, data: Iterable[Batch] | None,
              device: torch.device, *, seed: int = 0, **options: Any) -> Scores:
        scores: Scores = {}
        for g in graph.prunable_groups():
            # Per producer module: the filters of every class it produces.
            per_module: dict[str, list[tuple[int, torch.Tensor]]] = defaultdict(list)
            for ci, slots in enumerate(g.classes):
                for name, row in producer_rows(model, slots):
                    per_module[name].append((ci, row.double()))
            total = torch.zeros(g.channels, dtype=torch.float64)
            count = torch.zeros(g.channels, dtype=torch.float64)
            for entries in per_module.values():
                idx = torch.tensor([ci for ci, _ in entries])
                filters = torch.stack([r for _, r in entries])
                dist = torch.cdist(filters, filters).sum(dim=1)
                total.index_add_(0, idx, dist)
                count.index_add_(0, idx, torch.ones_like(dist))
            scores[g.id] = total / count.clamp_min(1)
        return scores
