"""`whitebox` — White-Box class-wise masks (Zhang et al.; see criteria/whitebox.py) trained inside
the fine-tuning loop.

During the first `until` fraction of the run the weights are frozen and the model runs in eval
mode (BatchNorm running statistics) while masks M ∈ R^{K×C} per group gate the channels
(gate = M[y] + Σ_{k≠y} u_k·M[k], u ~ U(0, 1) per sample) and are trained by plain SGD (lr 0.1)
on CE + λ·Σ_groups ‖Σ_k M[k, :]‖₂. Then the channels with the lowest |Σ_k M[k, c]| are removed
by one global ranking to the target (floor 30 % per layer unless --min-keep is given), the
surviving channels' BatchNorm (or producer) affine parameters are rescaled by Σ_k M[k, c] / 2,
the removal is verified, and the rest of the run fine-tunes the smaller model with its own
warm-up + cosine learning-rate schedule.

Against the authors' code (zyxxmu/White-Box; criteria/whitebox.py says more): they train masks and
weights together for 30 epochs from a random initialisation, then prune by global voting with a
30 % floor and fine-tune for 300 epochs. Here the masks train on the frozen, already trained
weights for the first `until` of the run (λ 5e-3, plain SGD) and are folded into the BatchNorm as
the authors do. In one-shot pruning (the criterion) that fold cost accuracy once frozen weights had
seen the masks train for a few hundred steps, so the criterion leaves it off by default; here the
fine-tuning that follows retrains the weights around it (not measured). `bench/papers.py --method
whitebox` runs the authors' protocol through the criterion.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import torch
from torch import nn

from ...criteria.gates import ChannelGates
from ...criteria.whitebox import class_gates, num_classes
from ...engine.points import scale_outputs
from ...errors import UserError
from ...support import distributed as D
from ..optim import WarmupCosine
from ..sampling import mix_seed
from ..trainer import Trainer
from .base import PruningSchedule, register_schedule


class WhiteboxSchedule(PruningSchedule):
    """Class-wise mask training, global-voting removal and BN rescaling: see the module docstring.

    With `prune=False` the masks are only trained (for `until` of the run) and kept in `masks`:
    the whitebox criterion's mask training expressed as this loop.
    """

    name = "whitebox"
    criterion = "whitebox"
    options: ClassVar[tuple[str, ...]] = ("seed", "lam")

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
        self._remove(trainer, allocation, carry_momentum=False)  # the frozen phase's momentum is meaningless
        # The fine-tuning phase gets its own warm-up and cosine decay.
        trainer.scheduler = WarmupCosine(trainer.total_steps, trainer.cfg.warmup, trainer.cfg.min_lr, start=trainer.step)
        self.events.append({"step": trainer.step, "removed": sum(len(v) for v in allocation.plan.values())})
        self.done = True

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


register_schedule("whitebox", WhiteboxSchedule)
