"""Reproducible DataLoaders over `--data` sources, and checking labels against a model.

Owns batching, the seeded sampler (first N samples, or a seeded random subset), per-worker
seeding of augmentation, keeping stop signals away from loader workers, and the
labels-vs-model-outputs check.
"""

from __future__ import annotations

import os
import random
import signal
import threading
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, RandomSampler

from ..errors import UserError
from .sources import open_dataset

__all__ = ["check_labels", "ignore_stop_signals", "iterate_with_workers", "make_loader"]

_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def ignore_stop_signals(worker_id: int = 0) -> None:
    """Worker init: SIGINT/SIGTERM are ignored in loader workers (then released from the hold of
    `iterate_with_workers`). Ctrl-C, `timeout`, SLURM and Kubernetes signal the whole process
    group; the main process decides what the signal means (training saves its state first) and
    ends its workers itself, so a worker killed by the signal would only turn that into a crash."""
    for sig in _STOP_SIGNALS:
        try:
            signal.signal(sig, signal.SIG_IGN)
        except (ValueError, OSError):  # pragma: no cover - a worker started from a non-main thread
            return
    if hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOP_SIGNALS)


def iterate_with_workers(loader: DataLoader[Any]) -> Iterator[Any]:
    """`iter(loader)` with SIGINT/SIGTERM held while its worker processes start: they inherit the
    hold and ignore both before releasing it (`ignore_stop_signals` as their init), so a signal to
    the process group never reaches a worker in its first moments. This process gets its own
    signals as soon as the workers exist."""
    if loader.num_workers == 0 or not hasattr(signal, "pthread_sigmask") \
            or threading.current_thread() is not threading.main_thread():
        return iter(loader)
    held = signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
    try:
        return iter(loader)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, held)


def _worker_init(worker_id: int) -> None:
    """Seed each worker from the loader's generator (torch sets info.seed = base_seed + worker_id)."""
    ignore_stop_signals(worker_id)
    info = torch.utils.data.get_worker_info()
    if info is None:  # pragma: no cover - only called inside workers
        return
    random.seed(info.seed)
    np.random.seed(info.seed % 2**32)
    reseed = getattr(info.dataset, "reseed", None)
    if callable(reseed):
        reseed(info.seed)


def make_loader(
    source: str | os.PathLike[str] | Dataset[Any],
    *,
    batch_size: int = 64,
    workers: int = 0,
    seed: int = 0,
    shuffle: bool = False,
    train: bool = False,
    input_shape: Sequence[int] | str | None = None,
    mean: Sequence[float] | str | None = None,
    std: Sequence[float] | str | None = None,
    max_batches: int | None = None,
    drop_last: bool = False,
    pin_memory: bool = False,
) -> DataLoader[Any]:
    """A reproducible DataLoader over `source` (a `--data` string or an opened data set).

    Shuffling, augmentation and worker seeds all derive from `seed`; `max_batches` limits the
    number of samples drawn (first ones when not shuffling, a random subset when shuffling).
    """
    if batch_size < 1:
        raise UserError(f"--batch-size must be at least 1, got {batch_size}")
    if workers < 0:
        raise UserError(f"--workers must be 0 or more, got {workers}")
    if max_batches is not None and max_batches < 1:
        raise UserError(f"the batch limit must be at least 1, got {max_batches}")
    if isinstance(source, Dataset):
        dataset: Dataset[Any] = source
    else:
        dataset = open_dataset(source, input_shape=input_shape, mean=mean, std=std, train=train)
    reseed = getattr(dataset, "reseed", None)
    if callable(reseed):
        reseed(seed)
    generator = torch.Generator()
    generator.manual_seed(seed)
    n = len(dataset)  # type: ignore[arg-type]
    limit = n if max_batches is None else min(n, max_batches * batch_size)
    sampler: Any
    if shuffle:
        sampler = RandomSampler(dataset, num_samples=limit, generator=generator)  # type: ignore[arg-type]
    else:
        sampler = range(limit)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=workers,
        worker_init_fn=_worker_init if workers > 0 else None,
        generator=generator,
        drop_last=drop_last,
        pin_memory=pin_memory,
    )


def check_labels(dataset: Dataset[Any] | DataLoader[Any], num_classes: int) -> None:
    """UserError when the data's labels do not fit a model with `num_classes` outputs."""
    if isinstance(dataset, DataLoader):
        dataset = dataset.dataset
    targets = getattr(dataset, "targets", None)
    if targets is None:
        return  # a foreign data set: evaluate() still checks every batch
    max_label = max(targets) if len(targets) else -1
    data_classes = getattr(dataset, "num_classes", None) or (max_label + 1)
    if max_label >= num_classes or data_classes > num_classes:
        raise UserError(
            f"data has {data_classes} classes but the model outputs {num_classes}; "
            "check --data and the checkpoint"
        )
