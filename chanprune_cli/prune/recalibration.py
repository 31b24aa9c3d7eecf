"""Post-pruning BatchNorm recalibration: re-estimate running statistics on calibration batches.

Removing channels changes what every later BatchNorm sees, so its stored mean/variance are stale;
re-estimating them (no gradient, weights untouched) recovers much of the one-shot accuracy drop.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from ..errors import UserError
from ..support.progress import batches_total, progress_bar


@torch.no_grad()
def recalibrate_bn(model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], device: torch.device,
                   max_batches: int) -> int:
    """Reset and re-estimate every BatchNorm's running statistics in place; returns batches used.

    Uses a cumulative average (momentum=None) so every batch counts equally; the model's
    train/eval mode, device and the norms' momenta are restored afterwards.
    """
    from ..measure import preserved_mode_and_device

    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if not norms or max_batches <= 0:
        return 0
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
    used = 0
    try:
        # a bar (on a terminal): on ImageNet-size models this pass takes minutes
        with progress_bar("rate") as bar, preserved_mode_and_device(model, torch.device(device), eval_mode=False):
            task = bar.add_task("re-estimating BatchNorm statistics", total=batches_total(batches, max_batches), rate="")
            model.train()
            for images, _ in batches:
                if used >= max_batches:
                    break
                model(images.to(device, non_blocking=True))
                used += 1
                bar.advance(task)
    finally:
        for m, momentum in zip(norms, momenta):
            m.momentum = momentum
    if used == 0:
        raise UserError("BatchNorm recalibration got no batches from --data")
    return used
