"""`random`: uniform random scores from the seed — the baseline every criterion must beat."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from ..engine.graph import ChannelGraph
from .base import Batch, Criterion, Scores, register


@register
class Random(Criterion):
    name = "random"
    summary = "uniform random scores from --seed (baseline)"

    def score(self, model: nn.Module, graph: ChannelGraph, data: Iterable[Batch] | None,
              device: torch.device, *, seed: int = 0, **options: Any) -> Scores:
        generator = torch.Generator().manual_seed(seed)
        return {g.id: torch.rand(g.channels, generator=generator, dtype=torch.float64) for g in graph.prunable_groups()}
