"""`fpgm`: filter pruning via geometric median (He et al., CVPR 2019).

Filters close to the geometric median of their layer are the most replaceable. As in the paper's
code, a filter's score is the sum of its Euclidean distances to the other filters of the layer;
the lowest sums are removed. Multi-producer channels average over their producers.
"""

from __future__ import annotations

import torch

from .base import Criterion, Scores, ScoringRun, producer_filter_means, register


@register("fpgm", summary="distance to the layer's geometric median (weights only)")
class FPGM(Criterion):
    def compute(self, run: ScoringRun) -> Scores:
        def distance_sums(filters: torch.Tensor) -> torch.Tensor:
            return torch.cdist(filters, filters).sum(dim=1)

        return {g.id: producer_filter_means(run.model, g, distance_sums) for g in run.graph.prunable_groups()}
