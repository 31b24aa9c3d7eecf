"""Training-time pruning schedules, as `train.Hook`s of the fine-tuning loop.

`asfp` — asymptotic soft filter pruning (He et al.). At the end of every pruning interval t
(default: one epoch) the lowest-L2-norm filters of every prunable group are zeroed at rate P_t;
zeroed filters keep training and are re-selected every interval. The rate follows

    P_t = a·e^{−k·t} + b   through (0, 0), (D, ¾P) and (T, P),   D = T/8,

with T the number of intervals (`asfp_coefficients` solves a, k, b; b = −a and x = e^{−kD} is the
root in (0, 1) of (1 − x^{T/D}) / (1 − x) = 4/3, so P_t ≈ P·(1 − 4^{−t/D})). At the end of the
last interval the zeroed channels are removed physically by the surgery engine, verified against
the masked model, and (with `--prune-until` < 1) the smaller model is fine-tuned for the rest of
the run. `sfp` is the same with the constant rate P from the first interval on.

"Zeroing a filter" (`engine.surgery.zero_producers`) sets the weight rows (and bias) of every producer of the
channel to zero, as SFP does; the channel's BatchNorm is left alone so the filter receives
gradients and can grow back. The final removal masks the whole channel (BatchNorm included,
`surgery.mask_model`) before cutting it, so the saved model is exactly the masked one.

`cac` — conditional accuracy change, online (*reconstructed*, see criteria/cac.py). Every step
the channels of every prunable group are switched off per sample with probability `drop_prob`
(`ChannelGates`); `CACEstimator` accumulates the loss with each channel on vs off and the
first-order estimate −∂L/∂gate. Every `interval` steps during the first `until` fraction of
training the lowest-importance channels are removed physically (surgery + verify; the optimizer's
momentum is carried through the same surgery), in equal steps of the target, until the target
width. Then the gates are removed and training continues on the final architecture. DCPH ("double
channels, prune half") is set up by the CLI: a built-in architecture at twice its width, trained
from initialisation, with half of the channels pruned.

`whitebox` — White-Box class-wise masks (Zhang et al.; see criteria/whitebox.py) trained inside this
loop: during the first `until` fraction of the run the weights are frozen and the model runs in
eval mode (BatchNorm running statistics) while masks M ∈ R^{K×C} per group gate the channels
(gate = M[y] + Σ_{k≠y} u_k·M[k], u ~ U(0, 1) per sample) and are trained by plain SGD (lr 0.1)
on CE + λ·Σ_groups ‖Σ_k M[k, :]‖₂. Then the channels with the lowest |Σ_k M[k, c]| are removed
by one global ranking to the target (floor 30 % per layer unless --min-keep is given), the
surviving channels' BatchNorm (or producer) affine parameters are rescaled by Σ_k M[k, c] / 2,
the removal is verified, and the rest of the run fine-tunes the smaller model with its own
warm-up + cosine learning-rate schedule.

Targets: `ratio` (fraction of the channels of every group, uniform) or `target_flops` (fraction
of the MACs, one global ranking), the same allocation rules as `chanprune prune` (`min_keep`,
`round_to`, `ignore`).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..support import distributed as D
from ..errors import ChanpruneError, UserError
from ..engine.points import scale_outputs
from ..engine.surgery import zero_producers
from . import Hook, Trainer, mix_seed

__all__ = [
    "CACSchedule",
    "WhiteboxSchedule",
    "SoftFilterPruning",
    "asfp_coefficients",
    "asfp_rate",
    "make_schedule",
]

SCHEDULES = ("none", "asfp", "sfp", "cac", "whitebox")


# --------------------------------------------------------------------------------------------
# the ASFP rate


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


class _PruningSchedule(Hook):
    """Shared parts: the target, the allocation rules, and the final physical removal."""

    criterion = "schedule"

    def __init__(self, *, input_shape: Sequence[int], ratio: float | None = None, target_flops: float | None = None,
                 interval: int | None = None, until: float = 1.0, min_keep: float = 0.1, round_to: int = 1,
                 ignore: Sequence[str] = ()) -> None:
        if (ratio is None) == (target_flops is None):
            raise UserError(f"--schedule {self.name} needs exactly one of --ratio or --target-flops")
        for label, value in (("--ratio", ratio), ("--target-flops", target_flops)):
            if value is not None and not 0 < value < 1:
                raise UserError(f"{label} must be between 0 and 1 (exclusive), got {value:g}")
        if interval is not None and interval < 1:
            raise UserError(f"--prune-every must be at least 1 step, got {interval}")
        if not 0 < until <= 1:
            raise UserError(f"--prune-until must be in (0, 1], got {until:g}")
        self.input_shape = tuple(input_shape)
        self.ratio, self.target_flops = ratio, target_flops
        self.target = ratio if ratio is not None else target_flops
        self.interval_opt, self.until = interval, until
        self.min_keep, self.round_to, self.ignore = min_keep, round_to, tuple(ignore)
        self.graph: Any = None
        self.records: list[dict[str, Any]] = []
        self.events: list[dict[str, Any]] = []
        self.done = False
        self.verify_result: dict[str, Any] | None = None

    @property
    def final_architecture(self) -> bool:  # type: ignore[override]
        return self.done

    def _allocate(self, scores: Mapping[int, torch.Tensor], amount: float) -> Any:
        from ..engine.allocate import allocate

        if self.ratio is not None:
            return allocate(self.graph, scores, ratio=amount, min_keep=self.min_keep, round_to=self.round_to)
        return allocate(self.graph, scores, target_flops=amount, min_keep=self.min_keep, round_to=self.round_to)

    def _build_graph(self, model: nn.Module) -> None:
        from ..engine.graph import build_graph

        self.graph = build_graph(model, self.input_shape, ignore=self.ignore)
        if not self.graph.prunable_groups():
            raise UserError("this model has no prunable channel group (see `chanprune analyze` for the reasons)")

    def _remove(self, trainer: Trainer, allocation: Any) -> None:
        """Remove `allocation.plan` physically, verify against the masked model, continue training it."""
        from ..prune.pruning import plan_record
        from ..engine.surgery import prune_model, verify

        model = trainer.model
        plan = allocation.plan
        pruned = copy.deepcopy(model)
        prune_model(pruned, self.graph, plan)
        result = verify(model, self.graph, plan, pruned, self.input_shape)
        if not result.passed:
            raise ChanpruneError(f"{self.name}: verification failed: the pruned model differs from the masked one by "
                                 f"{result.max_abs_diff:.3g} (tolerance {result.tolerance:.3g})")
        self.verify_result = {"max_abs_diff": result.max_abs_diff, "tolerance": result.tolerance, "passed": result.passed}
        self.records.append(plan_record(self.graph, allocation, self.criterion))
        trainer.replace_model(pruned, graph=self.graph, plan=plan)

    def plans(self) -> list[dict[str, Any]]:
        return list(self.records)


# --------------------------------------------------------------------------------------------
# ASFP / SFP


class SoftFilterPruning(_PruningSchedule):
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
        from ..criteria import get_criterion

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
            from ..engine.surgery import mask_model

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


# --------------------------------------------------------------------------------------------
# CAC


class CACSchedule(_PruningSchedule):
    """Online conditional-accuracy-change pruning: see the module docstring."""

    name = "cac"
    criterion = "cac"

    def __init__(self, *, drop_prob: float = 0.1, mc_weight: float = 0.5, metric: str = "loss",
                 seed: int = 0, until: float = 0.25, rounds: int = 4, **kw: Any) -> None:
        super().__init__(until=until, **kw)
        if not 0 < drop_prob < 1:
            raise UserError(f"--drop-prob must be between 0 and 1, got {drop_prob}")
        if metric not in ("loss", "accuracy"):
            raise UserError(f"the CAC metric must be loss or accuracy, got {metric!r}")
        if rounds < 1:
            raise UserError(f"the number of CAC pruning rounds must be at least 1, got {rounds}")
        self.drop_prob, self.mc_weight, self.metric, self.seed = drop_prob, mc_weight, metric, seed
        self.rounds_opt = rounds
        self.round = 0
        self.gates: Any = None
        self.estimator: Any = None
        self._draw: dict[int, torch.Tensor] | None = None
        self._pending: Mapping[str, Any] | None = None
        self.base_macs: int | None = None

    def on_train_start(self, trainer: Trainer) -> None:
        end = max(1, round(self.until * trainer.total_steps))
        if self.interval_opt is not None:
            self.interval = self.interval_opt
            self.n_rounds = max(1, end // self.interval)
        else:
            self.n_rounds = max(1, min(self.rounds_opt, end))
            self.interval = max(1, end // self.n_rounds)
        self.event_steps = [self.interval * (i + 1) for i in range(self.n_rounds)]
        if self.base_macs is None:
            from ..engine.allocate import MacsEstimator
            from ..engine.graph import build_graph

            self.base_macs = MacsEstimator(build_graph(trainer.model, self.input_shape, ignore=self.ignore)).macs({})
        if not self.done:
            self._setup(trainer)
            if self._pending is not None:
                self._load_estimator(self._pending)
        self._pending = None

    def _setup(self, trainer: Trainer) -> None:
        from ..criteria.cac import CACEstimator
        from ..criteria.gates import ChannelGates

        self._build_graph(trainer.model)
        self.gates = ChannelGates(trainer.model, self.graph).__enter__()
        seed = mix_seed(self.seed, trainer.env.rank, self.round, 0xCAC)
        self.estimator = CACEstimator(self.gates.channels, trainer.device, drop_prob=self.drop_prob, seed=seed)

    def _teardown(self) -> None:
        if self.gates is not None:
            self.gates.gates = {}
            self.gates.__exit__(None, None, None)
            self.gates = None

    def before_forward(self, trainer: Trainer, x: torch.Tensor, y: torch.Tensor) -> None:
        if self.done or self.gates is None:
            return
        self._draw = self.estimator.draw(x.shape[0])
        self.gates.gates = dict(self._draw)

    def after_backward(self, trainer: Trainer, logits: torch.Tensor, y: torch.Tensor) -> None:
        if self._draw is None:
            return
        draw, self._draw = self._draw, None
        self.gates.gates = {}
        # The training loss is a batch mean: d(sum of per-sample losses)/d(gate) = B · grad.
        factor = logits.shape[0] / trainer.loss_scale()
        grads = {gid: (g.grad * factor if g.grad is not None else None) for gid, g in draw.items()}
        if any(v is not None and not torch.isfinite(v).all() for v in grads.values()):
            return  # an fp16 overflow step (skipped by the scaler): no information
        losses = F.cross_entropy(logits.float(), y, reduction="none")
        self.estimator.update(losses, logits.argmax(-1) == y, draw, grads)

    def _reduce(self, trainer: Trainer) -> None:
        est = self.estimator
        sums = {(attr, gid): t for attr, per_group in _accumulators(est).items() for gid, t in per_group.items()}
        D.all_reduce_sums(sums, trainer.env)
        total = torch.tensor([float(est.samples)], dtype=torch.float64)
        D.all_reduce_sum_(total, trainer.env)
        est.samples = int(total.item())

    def _amount(self, i: int) -> float:
        """The per-round removal (relative to the current model) reaching i/R of the target."""
        assert self.target is not None
        frac = i / self.n_rounds
        if self.ratio is not None:
            before = 1 - self.ratio * (i - 1) / self.n_rounds
            after = 1 - self.ratio * frac
            return 1 - after / before
        from ..engine.allocate import MacsEstimator

        current = MacsEstimator(self.graph).macs({})
        goal = (self.base_macs or current) * (1 - self.target * frac)
        return 1 - goal / current if current > 0 else 0.0

    def on_step_end(self, trainer: Trainer) -> None:
        if self.done or trainer.step not in self.event_steps:
            return
        self._reduce(trainer)
        scores = self.estimator.scores(self.mc_weight, self.metric)
        self.round += 1
        amount = self._amount(self.round)
        self._teardown()
        removed = 0
        if amount > 1e-6:
            allocation = self._allocate(scores, min(amount, 0.999))
            removed = sum(len(v) for v in allocation.plan.values())
            if removed:
                self._remove(trainer, allocation)
        self.events.append({"step": trainer.step, "round": self.round, "amount": amount, "removed": removed})
        if self.round >= self.n_rounds:
            self.done = True
            self.estimator = None
        else:
            self._setup(trainer)

    def on_train_end(self, trainer: Trainer) -> None:
        self._teardown()

    def _load_estimator(self, state: Mapping[str, Any]) -> None:
        est_state = state.get("estimator")
        if not est_state or self.estimator is None:
            return
        est = self.estimator
        for attr, per_group in _accumulators(est).items():
            for gid, t in per_group.items():
                t.copy_(est_state[attr][str(gid)].to(t.device))
        est.samples = int(est_state["samples"])
        est.generator.set_state(est_state["generator"])

    def state_dict(self) -> dict[str, Any]:
        est = self.estimator
        est_state = None
        if est is not None:
            est_state = {attr: {str(gid): t.detach().cpu().clone() for gid, t in per_group.items()}
                         for attr, per_group in _accumulators(est).items()}
            est_state["samples"] = est.samples
            est_state["generator"] = est.generator.get_state()
        return {"round": self.round, "done": self.done, "events": list(self.events), "records": list(self.records),
                "verify": self.verify_result, "base_macs": self.base_macs, "estimator": est_state}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.round = int(state.get("round", 0))
        self.done = bool(state.get("done", False))
        self.events = list(state.get("events") or [])
        self.records = list(state.get("records") or [])
        self.verify_result = state.get("verify")
        self.base_macs = state.get("base_macs")
        self._pending = state

    def summary(self) -> dict[str, Any]:
        return {"schedule": "cac", "ratio": self.ratio, "target_flops": self.target_flops,
                "drop_prob": self.drop_prob, "mc_weight": self.mc_weight, "metric": self.metric,
                "event_steps": getattr(self, "event_steps", None), "events": list(self.events),
                "done": self.done, "verify": self.verify_result}


def _accumulators(estimator: Any) -> dict[str, dict[int, torch.Tensor]]:
    """The estimator's running sums: every attribute holding {group id: tensor} (all are sums over
    samples, so they are saved, restored and all-reduced alike)."""
    return {name: value for name, value in sorted(vars(estimator).items())
            if isinstance(value, dict) and value and all(isinstance(k, int) and isinstance(v, torch.Tensor)
                                                         for k, v in value.items())}


# --------------------------------------------------------------------------------------------
# White-Box masks


class WhiteboxSchedule(_PruningSchedule):
    """Class-wise mask training, global-voting removal and BN rescaling: see the module docstring.

    With `prune=False` the masks are only trained (for `until` of the run) and kept in `masks`:
    the whitebox criterion's mask training expressed as this loop.
    """

    name = "whitebox"
    criterion = "whitebox"

    def __init__(self, *, lam: float = 5e-3, mask_lr: float = 0.1, max_grad_norm: float = 5.0, seed: int = 0,
                 until: float = 0.2, prune: bool = True, min_keep: float = 0.3, **kw: Any) -> None:
        if not prune:
            kw.setdefault("ratio", 0.5)  # unused: only the masks are trained
        super().__init__(until=until, min_keep=min_keep, **kw)
        if lam < 0 or mask_lr <= 0:
            raise UserError(f"whitebox: lam must be >= 0 and the mask lr positive, got {lam}, {mask_lr}")
        self.lam, self.mask_lr, self.max_grad_norm, self.seed, self.prune = lam, mask_lr, max_grad_norm, seed, prune
        self.masks: dict[int, torch.Tensor] = {}
        self.gates: Any = None
        self.generator: torch.Generator | None = None
        self._pending: Mapping[str, Any] | None = None
        self._active = False

    def on_train_start(self, trainer: Trainer) -> None:
        self.end_step = max(1, round(self.until * trainer.total_steps))
        if self.done:
            return
        from ..criteria.gates import ChannelGates
        from ..criteria.whitebox import num_classes

        self._build_graph(trainer.model)
        self.gates = ChannelGates(trainer.model, self.graph).__enter__()
        was_training = trainer.model.training
        trainer.model.eval()  # a probe forward in train mode would move the BatchNorm statistics
        try:
            k = num_classes(trainer.model, self.graph, trainer.device)
        finally:
            trainer.model.train(was_training)
        init = 2.0 / (k + 1)
        if not self.masks:
            self.masks = {gid: torch.full((k, c), init, device=trainer.device, requires_grad=True)
                          for gid, c in self.gates.channels.items()}
        self.generator = torch.Generator(device=trainer.device).manual_seed(mix_seed(self.seed, trainer.env.rank, 0xB0B))
        pending, self._pending = self._pending, None
        if pending is not None and pending.get("masks"):
            with torch.no_grad():
                for gid, m in self.masks.items():
                    m.copy_(pending["masks"][str(gid)].to(m.device))
            self.generator.set_state(pending["generator"])
        self._active = trainer.step < self.end_step
        trainer.weights_frozen = self._active

    def param_groups(self, trainer: Trainer) -> list[dict[str, Any]]:
        if self.done or not self.masks:
            return []
        return [{"params": list(self.masks.values()), "lr": self.mask_lr, "base_lr": self.mask_lr, "momentum": 0.0,
                 "nesterov": False, "weight_decay": 0.0, "scheduled": False, "name": "whitebox-masks"}]

    def before_forward(self, trainer: Trainer, x: torch.Tensor, y: torch.Tensor) -> None:
        if not self._active:
            return
        from ..criteria.whitebox import class_gates

        trainer.model.eval()  # frozen weights, BatchNorm running statistics (as the criterion)
        assert self.generator is not None
        self.gates.gates = class_gates(self.masks, y, self.generator)

    def extra_loss(self, trainer: Trainer, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor | None:
        if not self._active or self.lam == 0:
            return None
        return self.lam * sum(m.sum(0).norm(p=2) for m in self.masks.values())

    def after_backward(self, trainer: Trainer, logits: torch.Tensor, y: torch.Tensor) -> None:
        if not self._active:
            return
        self.gates.gates = {}
        grads = [m.grad for m in self.masks.values() if m.grad is not None]
        if not grads:
            return
        scale = trainer.loss_scale()
        if trainer.env.distributed:  # masks are not DDP parameters: average their gradients here
            flat = {i: g for i, g in enumerate(grads)}
            D.all_reduce_sums(flat, trainer.env)
            for g in grads:
                g.div_(trainer.env.world_size)
        if scale != 1.0:
            for g in grads:
                g.div_(scale)
        if self.max_grad_norm > 0:
            total = float(torch.sqrt(sum(g.double().square().sum() for g in grads)))
            if total > self.max_grad_norm:
                for g in grads:
                    g.mul_(self.max_grad_norm / total)

    def on_step_end(self, trainer: Trainer) -> None:
        if not self._active or trainer.step < self.end_step:
            return
        self._active = False
        trainer.weights_frozen = False
        trainer.model.train()
        self.gates.gates = {}
        self.gates.__exit__(None, None, None)
        points, self.gates = self.gates.points, None
        if not self.prune:
            self.done = True
            return
        scores = {gid: m.detach().double().sum(0).abs().cpu() for gid, m in self.masks.items()}
        allocation = self._allocate(scores, self.target)  # type: ignore[arg-type]
        _rescale(trainer.model, points, self.masks, allocation.plan)
        self.masks = {}
        self._remove_fresh(trainer, allocation)
        # The fine-tuning phase gets its own warm-up and cosine decay.
        from . import WarmupCosine

        trainer.scheduler = WarmupCosine(trainer.total_steps, trainer.cfg.warmup, trainer.cfg.min_lr, start=trainer.step)
        self.events.append({"step": trainer.step, "removed": sum(len(v) for v in allocation.plan.values())})
        self.done = True

    def _remove_fresh(self, trainer: Trainer, allocation: Any) -> None:
        """`_remove`, but the optimizer starts fresh (the frozen phase's momentum is meaningless)."""
        from ..prune.pruning import plan_record
        from ..engine.surgery import prune_model, verify

        model = trainer.model
        pruned = copy.deepcopy(model)
        prune_model(pruned, self.graph, allocation.plan)
        result = verify(model, self.graph, allocation.plan, pruned, self.input_shape)
        if not result.passed:
            raise ChanpruneError(f"whitebox: verification failed ({result.max_abs_diff:.3g} > {result.tolerance:.3g})")
        self.verify_result = {"max_abs_diff": result.max_abs_diff, "tolerance": result.tolerance, "passed": result.passed}
        self.records.append(plan_record(self.graph, allocation, self.criterion))
        trainer.replace_model(pruned)

    def on_train_end(self, trainer: Trainer) -> None:
        if self.gates is not None:
            self.gates.__exit__(None, None, None)
            self.gates = None
        trainer.weights_frozen = False

    def state_dict(self) -> dict[str, Any]:
        return {"done": self.done, "events": list(self.events), "records": list(self.records),
                "verify": self.verify_result,
                "masks": {str(g): m.detach().cpu().clone() for g, m in self.masks.items()},
                "generator": self.generator.get_state() if self.generator is not None else None}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.done = bool(state.get("done", False))
        self.events = list(state.get("events") or [])
        self.records = list(state.get("records") or [])
        self.verify_result = state.get("verify")
        self._pending = state

    def summary(self) -> dict[str, Any]:
        return {"schedule": "whitebox", "ratio": self.ratio, "target_flops": self.target_flops, "lam": self.lam,
                "mask_lr": self.mask_lr, "mask_steps": getattr(self, "end_step", None), "min_keep": self.min_keep,
                "events": list(self.events), "done": self.done, "verify": self.verify_result}


@torch.no_grad()
def _rescale(model: nn.Module, points: Mapping[int, Sequence[Any]], masks: Mapping[int, torch.Tensor],
             plan: Mapping[int, Sequence[int]]) -> None:
    """Multiply every surviving channel at its gate points by Σ_k M[k, c] / 2 (BatchNorm affine, or
    the producer's weight rows and bias when no BatchNorm follows)."""
    modules = dict(model.named_modules())
    for gid, pts in points.items():
        factor = masks[gid].detach().sum(0) / 2
        removed = set(plan.get(gid, []))
        for pt in pts:
            keep = [(int(ch), int(c)) for ch, c in zip(pt.channels.tolist(), pt.classes.tolist()) if c not in removed]
            if keep:
                chans = torch.tensor([ch for ch, _ in keep], device=factor.device)
                scale_outputs(modules[pt.module], chans, factor[torch.tensor([c for _, c in keep], device=factor.device)])


# --------------------------------------------------------------------------------------------
# factory


def make_schedule(name: str, *, input_shape: Sequence[int], ratio: float | None, target_flops: float | None,
                  interval: int | None, until: float | None, min_keep: float | None, round_to: int,
                  ignore: Sequence[str], seed: int, drop_prob: float = 0.1, rounds: int = 4,
                  lam: float = 5e-3) -> Hook | None:
    """The hook for `--schedule NAME` (None for "none")."""
    if name not in SCHEDULES:
        raise UserError(f"unknown --schedule {name!r}; choose one of: {', '.join(SCHEDULES)}")
    if name == "none":
        if ratio is not None or target_flops is not None:
            raise UserError("--ratio/--target-flops need a pruning --schedule (asfp, sfp, cac or whitebox); to prune before "
                            "fine-tuning use `chanprune prune`")
        return None
    common = {"input_shape": input_shape, "ratio": ratio, "target_flops": target_flops, "interval": interval,
              "min_keep": 0.1 if min_keep is None else min_keep, "round_to": round_to, "ignore": ignore}
    if name == "whitebox":
        common["min_keep"] = 0.3 if min_keep is None else min_keep  # the paper's per-layer floor
        return WhiteboxSchedule(seed=seed, lam=lam, until=0.2 if until is None else until, **common)
    if name in ("asfp", "sfp"):
        return SoftFilterPruning(asymptotic=name == "asfp", until=1.0 if until is None else until, **common)
    return CACSchedule(seed=seed, drop_prob=drop_prob, rounds=rounds, until=0.25 if until is None else until, **common)
