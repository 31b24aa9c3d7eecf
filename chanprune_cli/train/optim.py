"""What the loop minimises and how: the distillation loss, SGD over decay / no-decay parameter
groups, the warm-up + cosine learning-rate schedule, and carrying momentum buffers through
channel surgery."""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UserError
from .config import TrainConfig


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Hinton et al.'s distillation term: T² · KL(softmax(t/T) ‖ softmax(s/T)), batch mean.

    The T² factor keeps its gradient scale independent of the temperature.
    """
    t = float(temperature)
    s = F.log_softmax(student_logits.float() / t, dim=-1)
    q = F.log_softmax(teacher_logits.float() / t, dim=-1)
    return F.kl_div(s, q, log_target=True, reduction="batchmean") * (t * t)


def param_groups(model: nn.Module, cfg: TrainConfig) -> list[dict[str, Any]]:
    """Two groups: weights with decay, and (unless `decay_norm_and_bias`) 1-D parameters without."""
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    for _, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 and not cfg.decay_norm_and_bias else decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay, "base_lr": cfg.lr, "scheduled": True, "name": "weights"}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0, "base_lr": cfg.lr, "scheduled": True, "name": "norm+bias"})
    return [g for g in groups if g["params"]]


def build_optimizer(model: nn.Module, cfg: TrainConfig, extra_groups: Sequence[dict[str, Any]] = ()) -> torch.optim.Optimizer:
    """SGD over `param_groups(model)` plus hook groups (each may set its own lr/decay/"scheduled")."""
    groups = param_groups(model, cfg)
    for g in extra_groups:
        g = dict(g)
        g.setdefault("base_lr", g.get("lr", cfg.lr))
        g.setdefault("weight_decay", 0.0)
        g.setdefault("scheduled", True)
        groups.append(g)
    if not groups:
        raise UserError("the model has no trainable parameters")
    nesterov = cfg.nesterov and cfg.momentum > 0
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=nesterov)


class WarmupCosine:
    """lr(step) = base·(step+1)/W during the W warm-up steps, then cosine from base to `min_lr`
    at `total`. A pure function of the step (its state is the step), applied to every param group
    flagged "scheduled" before each optimizer step. `start` shifts the schedule (a phase that
    begins later, e.g. after a pruning event, gets its own warm-up and decay)."""

    def __init__(self, total: int, warmup: float, min_lr: float = 0.0, start: int = 0) -> None:
        self.total = int(total)
        self.start = int(start)
        span = max(self.total - self.start, 1)
        self.warmup = int(round(warmup * span)) if warmup < 1 else int(warmup)
        self.warmup = min(self.warmup, span)
        self.min_lr = float(min_lr)

    def factor(self, step: int) -> float:
        """Multiplier of the base lr for the optimizer step that follows `step` completed steps."""
        s = step - self.start
        span = max(self.total - self.start, 1)
        if s < 0:
            return 1.0
        if self.warmup > 0 and s < self.warmup:
            return (s + 1) / self.warmup
        rest = max(span - self.warmup, 1)
        progress = min(max((s - self.warmup) / rest, 0.0), 1.0)
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    def lr(self, base: float, step: int) -> float:
        floor = min(self.min_lr, base)
        return floor + (base - floor) * self.factor(step)

    def apply(self, optimizer: torch.optim.Optimizer, step: int) -> float:
        """Set the lr of every scheduled group for the next step; return the first group's lr."""
        lr0 = None
        for g in optimizer.param_groups:
            if g.get("scheduled", True):
                g["lr"] = self.lr(g.get("base_lr", g["lr"]), step)
            lr0 = g["lr"] if lr0 is None else lr0
        return float(lr0 or 0.0)

    def state_dict(self) -> dict[str, Any]:
        return {"total": self.total, "start": self.start, "warmup": self.warmup, "min_lr": self.min_lr}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.total, self.start = int(state["total"]), int(state["start"])
        self.warmup, self.min_lr = int(state["warmup"]), float(state["min_lr"])


@torch.no_grad()
def carry_momentum(old_model: nn.Module, old_opt: torch.optim.Optimizer, new_model: nn.Module,
                   new_opt: torch.optim.Optimizer, graph: Any, plan: Mapping[int, Sequence[int]]) -> None:
    """Slice the old momentum buffers exactly as surgery sliced the weights, into the new optimizer."""
    from ..engine.surgery import prune_model  # not at the top: see the package docstring

    # A copy of the old model whose parameters hold the momentum buffers goes through the same
    # surgery, so the buffers come out sliced exactly like the weights.
    shadow = copy.deepcopy(old_model).cpu()
    old_params = dict(old_model.named_parameters())
    have: set[str] = set()
    for name, p in shadow.named_parameters():
        buf = old_opt.state.get(old_params[name], {}).get("momentum_buffer")
        if buf is not None and tuple(buf.shape) == tuple(p.shape):
            p.copy_(buf.detach().cpu())
            have.add(name)
    prune_model(shadow, graph, plan)
    sliced = dict(shadow.named_parameters())
    for name, p in new_model.named_parameters():
        if name in have and name in sliced and tuple(sliced[name].shape) == tuple(p.shape):
            # empty_like keeps the parameter's memory format (channels-last on CUDA).
            new_opt.state[p]["momentum_buffer"] = torch.empty_like(p).copy_(sliced[name].detach())
