"""`random`: uniform random scores from the seed — the baseline every criterion must beat."""

from __future__ import annotations

import torch

from .base import Criterion, Scores, ScoringRun, register


@register("random", summary="uniform random scores from --seed (baseline)")
class Random(Criterion):
    def compute(self, run: ScoringRun) -> Scores:
        generator = torch.Generator().manual_seed(run.seed)
        return {g.id: torch.rand(g.channels, generator=generator, dtype=torch.float64) for g in run.graph.prunable_groups()}
