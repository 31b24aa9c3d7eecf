"""Validation during and after training: top-1/top-5 and mean loss on a data set (or a fixed
random subset of it), sharded over the ranks of a distributed run and summed. The sums stay on the
device until the end (no host sync per batch); a data set held as one tensor on the device
(`data.tensorcache.TensorImages`) is batched there without a loader."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from ..data.loaders import ignore_stop_signals, iterate_with_workers
from ..data.tensorcache import TensorImages
from ..errors import UserError
from ..measure import logits_of
from ..support import distributed as D
from .losses import TaskLoss
from .precision import autocast
from .sampling import collate_labels


def held_out_batches(dataset: Dataset[Any] | TensorImages, device: torch.device, *, batch_size: int, workers: int,
                     env: D.DistEnv, max_images: int | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """This rank's share of `dataset` (or of a fixed random subset of `max_images`) in batches of
    (images, labels), on the host for a loader, on the device for a `TensorImages`."""
    n = len(dataset)  # type: ignore[arg-type]
    chosen = list(range(n))
    if max_images is not None and max_images < n:
        # A fixed random subset (data sets are often sorted by class), the same in every run.
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(0))[:max_images]
        chosen = sorted(perm.tolist())
    indices = chosen[env.rank::env.world_size]
    if isinstance(dataset, TensorImages):
        return (dataset.batch(torch.tensor(indices[i:i + batch_size], dtype=torch.long))
                for i in range(0, len(indices), batch_size))
    loader = DataLoader(torch.utils.data.Subset(dataset, indices), batch_size=batch_size, shuffle=False,
                        num_workers=workers, collate_fn=collate_labels, pin_memory=device.type == "cuda",
                        worker_init_fn=ignore_stop_signals if workers > 0 else None)
    return iterate_with_workers(loader)


@torch.inference_mode()
def validate(model: nn.Module, dataset: Dataset[Any] | TensorImages, device: torch.device, *, batch_size: int = 256,
             workers: int = 0, env: D.DistEnv | None = None, channels_last: bool = False,
             amp_dtype: torch.dtype | None = None, max_images: int | None = None,
             loss: TaskLoss | None = None) -> dict[str, float | int]:
    """Top-1/top-5 (percent), mean `loss` (default cross-entropy) and image count; sharded over
    ranks and summed."""
    loss = loss or TaskLoss()
    env = env or D.current()
    batches = held_out_batches(dataset, device, batch_size=batch_size, workers=workers, env=env, max_images=max_images)
    # the labels' maximum: of every label at once for a TensorImages, else of each batch on the host
    label_max = ([int(dataset.targets.max())] if len(dataset) else []) if isinstance(dataset, TensorImages) else None
    modes = [(m, m.training) for m in model.modules()]  # restored one by one: some may train, others not
    model.eval()
    sums = torch.zeros(3, dtype=torch.float64, device=device)  # correct1, correct5, loss
    counted = 0
    try:
        for x, y in batches:
            if label_max is None:
                tops = [int(y.max())] if y.numel() else []
            else:
                tops, label_max = label_max, []
            x = x.to(device, non_blocking=True)
            if channels_last and x.dim() == 4:
                x = x.contiguous(memory_format=torch.channels_last)
            y = y.to(device, non_blocking=True)
            with autocast(device, amp_dtype):
                logits = logits_of(model(x), model).float()
            if tops and tops[0] >= logits.shape[1]:
                raise UserError(f"validation data has labels up to {tops[0]} but the model outputs "
                                f"{logits.shape[1]} classes; check --val-data and the checkpoint")
            k = min(5, logits.shape[1])
            hits = logits.topk(k, dim=1).indices.eq(y[:, None])
            sums += torch.stack([hits[:, 0].sum().double(), hits.any(1).sum().double(),
                                 loss(logits, y, reduction="sum").double()])
            counted += int(y.numel())
    finally:
        for m, training in modes:
            m.training = training
    sums = torch.cat([sums.cpu(), torch.tensor([float(counted)], dtype=torch.float64)])
    D.all_reduce_sum_(sums, env)
    images = int(sums[3])
    if images == 0:
        raise UserError("no validation images: --val-data is empty")
    return {"top1": 100.0 * float(sums[0]) / images, "top5": 100.0 * float(sums[1]) / images,
            "loss": float(sums[2]) / images, "images": images}
