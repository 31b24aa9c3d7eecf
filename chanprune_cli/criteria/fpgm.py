"""`fpgm`: filter pruning via geometric median (He et al., CVPR 2019).

Filters close to the geometric median of their layer are the most replaceable. As in the paper's
code, a filter's score is the sum of its Euclidean distances to the other filters of the layer;
the lowest sums are removed. Multi-producer channels average over their producers.

Where chanprune follows the authors (he-y/filter-pruning-geometric-median, pruning_cifar10.py
`get_filter_similar`): the sum of Euclidean distances between flattened filters stands for the
distance to the geometric median. Where it departs: the authors prune softly, re-selecting 40 % of
every layer's filters (`--rate_dist 0.4`, `--rate_norm 1`) after each of 200 epochs of training
(pre-trained ResNet-56: lr 0.01, steps at 60/120/160 x0.2, scripts/pruning_cifar10.sh); here the
scores are one-shot, and a MACs target ranks them across layers (each divided by its layer's
mean), which their fixed per-layer rate never does. The soft schedule is `finetune --schedule sfp`
with the L2 norm (SFP, the same authors' previous paper).
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
