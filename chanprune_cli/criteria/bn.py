"""`bn`: |gamma| of the BatchNorm that scales a channel (Network Slimming, Liu et al., 2017).

Channels whose class has no BatchNorm fall back to the L2 norm of their producing filters, scaled
by the group's mean so that the two kinds stay comparable within a group.
"""

from __future__ import annotations

import torch
from torch import nn

from .base import Criterion, Scores, ScoringRun, per_class, producer_rows, register


@register("bn", summary="|gamma| of the channel's BatchNorm (weights only; L2 of filters where no BN)")
class BNScale(Criterion):
    def compute(self, run: ScoringRun) -> Scores:
        model = run.model
        modules = dict(model.named_modules())

        def gamma(slots: list) -> float:
            values = [abs(float(modules[m].weight.detach()[i])) for m, kind, i in slots
                      if kind == "norm" and isinstance(modules[m], nn.modules.batchnorm._BatchNorm)
                      and modules[m].weight is not None]
            return sum(values) / len(values) if values else float("nan")

        scores: Scores = {}
        for g in run.graph.prunable_groups():
            s = per_class(g, gamma)
            if torch.isnan(s).any():
                fallback = per_class(g, lambda slots: sum(float(r.norm()) for _, r in producer_rows(model, slots)))
                s = fallback / fallback.mean().clamp_min(1e-12) if torch.isnan(s).all() else torch.where(torch.isnan(s), s.nanmean(), s)
            scores[g.id] = s
        return scores
