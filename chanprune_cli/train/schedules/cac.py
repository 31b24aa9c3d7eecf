"""`cac` — conditional accuracy change, online (*reconstructed*, see criteria/cac.py).

Every step the channels of every prunable group are switched off per sample with probability
`drop_prob` (`ChannelGates`); `CACEstimator` accumulates the loss with each channel on vs off and
the first-order estimate −∂L/∂gate. Every `interval` steps during the first `until` fraction of
training the lowest-importance channels are removed physically (surgery + verify; the optimizer's
momentum is carried through the same surgery), in equal steps of the target, until the target
width. Then the gates are removed and training continues on the final architecture. DCPH ("double
channels, prune half") is set up by the CLI: a built-in architecture at twice its width, trained
from initialisation, with half of the channels pruned.

This is the paper's own setting (Chen et al., TNNLS 2021: gates drawn while the network trains,
unimportant channels pruned early in training, DCPH); no code was released, so the estimator, the
removal steps and their timing (`--cac-rounds`, `--prune-until`) are chanprune's. Each group's
scores are divided by their mean before the global ranking (`mc_weight` 0.5 fixed), as the
criterion's `units=group`; the criterion's default ranks loss changes as they are, which was
measured on one-shot pruning only.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from ...criteria.cac import CACEstimator
from ...criteria.gates import ChannelGates
from ...engine.allocate import MacsEstimator
from ...engine.graph import build_graph
from ...errors import UserError
from ...support import distributed as D
from ..sampling import mix_seed
from ..trainer import Trainer
from .base import PruningSchedule, register_schedule


class CACSchedule(PruningSchedule):
    """Online conditional-accuracy-change pruning: see the module docstring."""

    name = "cac"
    criterion = "cac"
    options: ClassVar[tuple[str, ...]] = ("seed", "drop_prob", "rounds")

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
            self.base_macs = MacsEstimator(build_graph(trainer.model, self.input_shape, ignore=self.ignore)).macs({})
        if not self.done:
            self._setup(trainer)
            if self._pending is not None:
                self._load_estimator(self._pending)
        self._pending = None

    def _setup(self, trainer: Trainer) -> None:
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


register_schedule("cac", CACSchedule)
