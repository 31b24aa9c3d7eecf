"""A smoke check that a model trains with this loop's optimizer (used by coverage sweeps): a few
steps on random data must give finite losses and reach every trainable parameter."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ChanpruneError
from ..measure import logits_of
from .config import TrainConfig
from .optim import build_optimizer


def train_step_check(model: nn.Module, input_shape: Sequence[int], *, batch: int = 2, steps: int = 1,
                     device: torch.device | str = "cpu", seed: int = 0) -> float:
    """Run `steps` SGD steps of this loop's optimizer on random data (train mode); return the last
    loss. Raises ChanpruneError when the loss is not finite or a parameter gets no gradient."""
    device = torch.device(device)
    g = torch.Generator().manual_seed(seed)
    model.to(device).train()
    cfg = TrainConfig(lr=1e-3)
    opt = build_optimizer(model, cfg)
    loss_value = float("nan")
    for _ in range(steps):
        x = torch.randn((batch, *input_shape), generator=g).to(device)
        logits = logits_of(model(x), model).float()
        y = torch.randint(0, logits.shape[-1], (batch,), generator=g).to(device)
        loss = F.cross_entropy(logits, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        no_grad = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
        opt.step()
        loss_value = float(loss.detach())
        if not math.isfinite(loss_value):
            raise ChanpruneError(f"training step gives a non-finite loss ({loss_value})")
        if no_grad:
            raise ChanpruneError(f"no gradient reaches {', '.join(no_grad[:3])}")
    return loss_value
