"""Validation during and after training: top-1/top-5 and mean loss on a data set (or a fixed
random subset of it), sharded over the ranks of a distributed run and summed."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from ..data.loaders import ignore_stop_signals, iterate_with_workers
from ..errors import UserError
from ..support import distributed as D
from .precision import autocast
from .sampling import collate_labels


@torch.inference_mode()
def validate(model: nn.Module, dataset: Dataset[Any], device: torch.device, *, batch_size: int = 256,
             workers: int = 0, env: D.DistEnv | None = None, channels_last: bool = False,
             amp_dtype: torch.dtype | None = None, max_images: int | None = None) -> dict[str, float | int]:
    """Top-1/top-5 (percent), mean cross-entropy and image count; sharded over ranks and summed."""
    from ..measure import logits_of

    env = env or D.current()
    n = len(dataset)  # type: ignore[arg-type]
    chosen = list(range(n))
    if max_images is not None and max_images < n:
        # A fixed random subset (data sets are often sorted by class), the same in every run.
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(0))[:max_images]
        chosen = sorted(perm.tolist())
    indices = chosen[env.rank::env.world_size]
    loader = DataLoader(torch.utils.data.Subset(dataset, indices), batch_size=batch_size, shuffle=False,
                        num_workers=workers, collate_fn=collate_labels, pin_memory=device.type == "cuda",
                        worker_init_fn=ignore_stop_signals if workers > 0 else None)
    was_training = model.training
    model.eval()
    sums = torch.zeros(4, dtype=torch.float64)  # correct1, correct5, loss, images
    try:
        for x, y in iterate_with_workers(loader):
            x = x.to(device, non_blocking=True)
            if channels_last and x.dim() == 4:
                x = x.contiguous(memory_format=torch.channels_last)
            y = y.to(device, non_blocking=True)
            with autocast(device, amp_dtype):
                logits = logits_of(model(x)).float()
            if y.numel() and int(y.max()) >= logits.shape[1]:
                raise UserError(f"validation data has labels up to {int(y.max())} but the model outputs "
                                f"{logits.shape[1]} classes; check --val-data and the checkpoint")
            k = min(5, logits.shape[1])
            hits = logits.topk(k, dim=1).indices.eq(y[:, None])
            sums += torch.tensor([float(hits[:, 0].sum()), float(hits.any(1).sum()),
                                  float(F.cross_entropy(logits, y, reduction="sum")), float(y.numel())],
                                 dtype=torch.float64)
    finally:
        model.train(was_training)
    D.all_reduce_sum_(sums, env)
    images = int(sums[3])
    if images == 0:
        raise UserError("no validation images: --val-data is empty")
    return {"top1": 100.0 * float(sums[0]) / images, "top5": 100.0 * float(sums[1]) / images,
            "loss": float(sums[2]) / images, "images": images}
