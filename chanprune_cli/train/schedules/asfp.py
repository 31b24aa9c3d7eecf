"""`asfp` — asymptotic soft filter pruning (He et al.); `sfp` — the same at a constant rate.

At the end of every pruning interval t (default: one epoch) the lowest-L2-norm filters of every
prunable group are zeroed at rate P_t; zeroed filters keep training and are re-selected every
interval. The rate follows

    P_t = a·e^{−k·t} + b   through (0, 0), (D, ¾P) and (T, P),   D = T/8,

with T the number of intervals (`asfp_coefficients` solves a, k, b; b = −a and x = e^{−kD} is the
root in (0, 1) of (1 − x^{T/D}) / (1 − x) = 4/3, so P_t ≈ P·(1 − 4^{−t/D})). At the end of the
last interval the zeroed channels are removed physically by the surgery engine, verified against
the masked model, and (with `--prune-until` < 1) the smaller model is fine-tuned for the rest of
the run. `sfp` is the same with the constant rate P from the first interval on.

Where chanprune follows the authors (he-y/soft-filter-pruning, pruning_cifar10_resnet.py and
scripts/cifar10_resnet.sh, the SFP code; the ASFP code was not released, its rate is the paper's):
each layer's filters ranked by L2 norm, the lowest zeroed at the end of every epoch
(`--epoch_prune 1`) and left to train, the BatchNorm untouched, a fixed rate for SFP (40 % of the
filters on ResNet-56, their README's row) and the asymptotic one for ASFP, then the zeroed
filters cut out. Where it departs: the authors zero every conv's filters independently (the
conv writing a residual stream too, whose zeroed rows the shortcut's channel then mixes back
in); chanprune ranks a channel graph's class as one (a residual stream's channel scores the mean
norm of its producers' filters and is zeroed in every producer at once), so what is zeroed is what
the final surgery removes; `--target-flops` ranks the groups globally where their `--rate` is per
layer. Their CIFAR runs train 200 epochs at lr 0.01 from the pre-trained model (steps ×0.2 at
epochs 60/120/160 in the FPGM scripts of the same authors, batch 128, weight decay 5e-4);
`bench/papers.py --method asfp` runs that with chanprune's warm-up + cosine schedule.

"Zeroing a filter" (`engine.surgery.zero_producers`) sets the weight rows (and bias) of every producer of the
channel to zero, as SFP does; the channel's BatchNorm is left alone so the filter receives
gradients and can grow back. The final removal masks the whole channel (BatchNorm included,
`surgery.mask_model`) before cutting it, so the saved model is exactly the masked one.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from ...criteria import get_criterion
from ...engine.surgery import mask_model, zero_producers
from ...errors import UserError
from ..trainer import Trainer
from .base import PruningSchedule, register_schedule


def asfp_coefficients(T: float, P: float, D_: float | None = None) -> tuple[float, float, float]:
    """(a, k, b) of P_t = a·e^{−kt} + b through (0, 0), (D, ¾P), (T, P); D defaults to T/8.

    With x = e^{−kD} and r = T/D: P_0 = 0 gives b = −a; the other two points give
    a(x − 1) = ¾P and a(x^r − 1) = P, so (1 − x^r)/(1 − x) = 4/3: x is its root in (0, 1) (the
    left side rises from 1 to r there; bisection to machine precision), k = −ln(x)/D,
    a = ¾P/(x − 1), b = −a.
    """
    if T <= 0:
        raise UserError(f"the ASFP schedule needs a positive length, got T={T}")
    D_ = T / 8 if D_ is None else D_
    if not 0 < D_ < T:
        raise UserError(f"the ASFP knee D must be in (0, T), got D={D_}, T={T}")
    if P == 0:
        return 0.0, 0.0, 0.0
    r = T / D_
    if r <= 4 / 3:
        raise UserError(f"the ASFP knee D={D_} is too close to T={T} (needs T/D > 4/3)")

    def f(x: float) -> float:
        return (1 - x**r) / (1 - x)

    lo, hi = 0.0, 1.0 - 1e-15
    for _ in range(200):
        mid = (lo + hi) / 2
        if f(mid) < 4 / 3:
            lo = mid
        else:
            hi = mid
    x = (lo + hi) / 2
    k = -math.log(x) / D_
    a = 0.75 * P / (x - 1)
    return a, k, -a


def asfp_rate(t: float, T: float, P: float, D_: float | None = None) -> float:
    """The ASFP pruning rate at time t (0 ≤ t ≤ T, in intervals): a·e^{−kt} + b (exact at 0, D, T)."""
    if t <= 0:
        return 0.0
    if t >= T:
        return P
    a, k, b = asfp_coefficients(T, P, D_)
    return a * math.exp(-k * t) + b


def _plan_json(plan: Mapping[int, Sequence[int]]) -> dict[str, list[int]]:
    return {str(k): [int(i) for i in v] for k, v in plan.items()}


def _plan_from_json(doc: Mapping[str, Sequence[int]] | None) -> dict[int, list[int]]:
    return {int(k): [int(i) for i in v] for k, v in (doc or {}).items()}


class SoftFilterPruning(PruningSchedule):
    """ASFP (`asymptotic=True`) or SFP (constant rate): see the module docstring."""

    def __init__(self, *, asymptotic: bool = True, **kw: Any) -> None:
        self.name = "asfp" if asymptotic else "sfp"
        self.criterion = self.name
        super().__init__(**kw)
        self.asymptotic = asymptotic
        self.plan: dict[int, list[int]] = {}

    def on_train_start(self, trainer: Trainer) -> None:
        self.end_step = max(1, round(self.until * trainer.total_steps))
        self.interval = self.interval_opt or trainer.steps_per_epoch
        self.T = max(1, math.ceil(self.end_step / self.interval))
        if self.T < 4 and not self.done:
            trainer.log(f"warning: {self.name}: only {self.T} pruning interval(s) of {self.interval} steps in this run; "
                        "pass --prune-every STEPS for a gradual schedule")
        if not self.done:
            self._build_graph(trainer.model)

    def rate(self, t: float) -> float:
        assert self.target is not None
        if self.asymptotic:
            return asfp_rate(t, self.T, self.target) if self.T > 1 else self.target
        return self.target if t > 0 else 0.0

    def on_step_end(self, trainer: Trainer) -> None:
        s = trainer.step
        if self.done or s > self.end_step or not (s % self.interval == 0 or s == self.end_step):
            return
        t = self.T if s == self.end_step else s // self.interval
        rate = self.rate(t)
        if rate <= 0:
            return
        scores = get_criterion("l2").score(trainer.model, self.graph, None, trainer.device)
        allocation = self._allocate(scores, min(rate, 0.999))
        self.plan = {k: list(v) for k, v in allocation.plan.items()}
        zeroed = sum(len(v) for v in self.plan.values())
        self.events.append({"step": s, "t": t, "rate": rate, "zeroed": zeroed})
        if s == self.end_step:
            mask_model(trainer.model, self.graph, self.plan)  # the whole channel, BatchNorm included
            self._remove(trainer, allocation)
            self.done = True
        else:
            zero_producers(trainer.model, self.graph, self.plan)

    def state_dict(self) -> dict[str, Any]:
        return {"plan": _plan_json(self.plan), "events": list(self.events), "done": self.done,
                "records": list(self.records), "verify": self.verify_result}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.plan = _plan_from_json(state.get("plan"))
        self.events = list(state.get("events") or [])
        self.done = bool(state.get("done", False))
        self.records = list(state.get("records") or [])
        self.verify_result = state.get("verify")

    def summary(self) -> dict[str, Any]:
        return {"schedule": self.name, "ratio": self.ratio, "target_flops": self.target_flops,
                "interval_steps": getattr(self, "interval", None), "intervals": getattr(self, "T", None),
                "end_step": getattr(self, "end_step", None), "removed": self.done,
                "rates": [round(e["rate"], 6) for e in self.events], "verify": self.verify_result}


register_schedule("asfp", SoftFilterPruning, asymptotic=True)
register_schedule("sfp", SoftFilterPruning, asymptotic=False)
