"""`l1` / `l2`: the norm of the filters that produce a channel (Li et al., 2017); option
`side=both` adds the consumers' input columns (the whole channel, as Torch-Pruning's magnitude
importance does).

A channel with several producers (a residual stream) scores the mean of their filter norms, so
groups with many producers stay comparable with single-producer groups.
"""

from __future__ import annotations

from typing import Any

from .base import (
    Criterion,
    Scores,
    ScoringRun,
    consumer_columns,
    per_class,
    producer_rows,
    register,
)
from .gates import choice

DEFAULTS: dict[str, Any] = {"side": "out"}


class _NormCriterion(Criterion):
    p: int = 1

    def compute(self, run: ScoringRun) -> Scores:
        model = run.model
        side = choice(self.name, "side", run.options["side"], ("out", "both"))

        def class_score(slots: list) -> float:
            # side=out: the producing filters (Li et al.); side=both also the consumers' input
            # columns, i.e. every weight that disappears with the channel.
            rows = producer_rows(model, slots) + (consumer_columns(model, slots) if side == "both" else [])
            return sum(float(r.norm(p=self.p)) for _, r in rows) / max(len(rows), 1)

        return {g.id: per_class(g, class_score) for g in run.graph.prunable_groups()}


@register("l1", defaults=DEFAULTS, summary="L1 norm of the producing filters (weights only)")
class L1(_NormCriterion):
    p = 1


@register("l2", defaults=DEFAULTS, summary="L2 norm of the producing filters (weights only)")
class L2(_NormCriterion):
    p = 2
