"""Deterministic sampling: every global batch is a fixed slice of a permutation seeded by
(seed, epoch), and every sample's augmentation is seeded by (seed, epoch, index). A run is
therefore independent of worker processes, of where it was interrupted, and of how many
processes it is split over."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch.utils.data import Dataset, Sampler

from ..data.devicejpeg import encoded_item

_MASK64 = (1 << 64) - 1


def mix_seed(*values: int) -> int:
    """A 63-bit seed from integers (splitmix64-style), for independent, reproducible streams."""
    h = 0x9E3779B97F4A7C15
    for v in values:
        h = ((h ^ (int(v) & _MASK64)) * 0xBF58476D1CE4E5B9) & _MASK64
        h ^= h >> 31
        h = (h * 0x94D049BB133111EB) & _MASK64
        h ^= h >> 29
    return h & 0x7FFF_FFFF_FFFF_FFFF


class KeyedDataset(Dataset[Any]):
    """Wraps a data set so that item `(key, i)` is sample i with its augmentation seeded by (key, i)."""

    def __init__(self, base: Dataset[Any]) -> None:
        self.base = base

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, item: tuple[int, int]) -> Any:
        key, index = item
        reseed = getattr(self.base, "reseed", None)
        if callable(reseed):
            reseed(mix_seed(key, index))
        return self.base[index]


class EpochBatches(Sampler[list[tuple[int, int]]]):
    """Global batches `start..stop-1` of one epoch; this rank's contiguous share of each.

    Global batch k is positions [k·G, (k+1)·G) of a permutation seeded by (seed, epoch); rank r of
    W takes its r-th slice of G/W samples. Resuming at step s of an epoch just starts at k = s.
    `indices`: the samples to draw from (n of them; default 0..n-1), the rest held out.
    """

    def __init__(self, n: int, global_batch: int, *, seed: int, epoch: int, start: int, stop: int,
                 rank: int = 0, world: int = 1, shuffle: bool = True, indices: Sequence[int] | None = None) -> None:
        self.n, self.global_batch, self.seed, self.epoch = n, global_batch, seed, epoch
        self.start, self.stop, self.rank, self.world, self.shuffle = start, stop, rank, world, shuffle
        self.local = global_batch // world
        self.indices = torch.as_tensor(list(indices), dtype=torch.long) if indices is not None else None

    def __len__(self) -> int:
        return max(self.stop - self.start, 0)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        if self.shuffle:
            g = torch.Generator().manual_seed(mix_seed(self.seed, self.epoch, 0x5A))
            perm = torch.randperm(self.n, generator=g)
        else:
            perm = torch.arange(self.n)
        if self.indices is not None:
            perm = self.indices[perm]
        key = mix_seed(self.seed, self.epoch, 0xA5)
        for k in range(self.start, self.stop):
            base = k * self.global_batch + self.rank * self.local
            yield [(key, int(i)) for i in perm[base:base + self.local].tolist()]


class KeyedDraws(Dataset[Any]):
    """The tensor input path's items: `(key, i)` is (i, top, left, flip), the crop and flip that
    `KeyedDataset` gives sample i (its generator seeded by (key, i)), without decoding it."""

    def __init__(self, base: Any, pad: int, flip: bool) -> None:
        self.base, self.pad, self.flip = base, pad, flip

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, item: tuple[int, int]) -> tuple[int, int, int, bool]:
        key, index = item
        self.base.reseed(mix_seed(key, index))
        return (index, *self.base.crop_flip_draws(self.pad, self.flip))


class KeyedEncoded(Dataset[Any]):
    """The device-decode path's items: `(key, i)` is (i, file bytes, crop box, flip, label), the box
    and flip that `KeyedDataset` gives sample i (its generator seeded by (key, i)), undecoded."""

    def __init__(self, base: Any) -> None:
        self.base = base

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, item: tuple[int, int]) -> tuple[int, torch.Tensor, tuple[int, int, int, int], bool, int]:
        key, index = item
        self.base.reseed(mix_seed(key, index))
        return (index, *encoded_item(self.base, index), self.base.targets[index])


class RunBatches(Sampler[list[tuple[int, int]]]):
    """`EpochBatches` of every epoch from global step `start` to `stop`: one loader serves the whole
    run, so its workers start once and prefetch across epoch ends."""

    def __init__(self, n: int, global_batch: int, steps_per_epoch: int, *, seed: int, start: int, stop: int,
                 rank: int = 0, world: int = 1, indices: Sequence[int] | None = None) -> None:
        self.n, self.global_batch, self.steps_per_epoch, self.seed = n, global_batch, steps_per_epoch, seed
        self.start, self.stop, self.rank, self.world, self.indices = start, stop, rank, world, indices

    def __len__(self) -> int:
        return max(self.stop - self.start, 0)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        step = self.start
        while step < self.stop:
            epoch = step // self.steps_per_epoch
            first = epoch * self.steps_per_epoch
            end = min(self.steps_per_epoch, self.stop - first)
            yield from EpochBatches(self.n, self.global_batch, seed=self.seed, epoch=epoch, start=step - first,
                                    stop=end, rank=self.rank, world=self.world, indices=self.indices)
            step = first + end


def collate_draws(batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """(indices [B], draws [B, 3] as top, left, flip) from `KeyedDraws` items."""
    rows = torch.as_tensor([[int(v) for v in item] for item in batch], dtype=torch.long)
    return rows[:, 0], rows[:, 1:]


def collate_labels(batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """(images stacked, labels as int64) from a list of (image, label, ...) samples."""
    xs, ys = zip(*[(b[0], b[1]) for b in batch])
    return torch.stack(xs), torch.as_tensor(ys, dtype=torch.long)


def collate_encoded(batch: Any) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor, torch.Tensor, torch.Tensor]:
    """(indices [B], file bytes, boxes [B, 4], flips [B], labels [B]) from `KeyedEncoded` items."""
    indices, encoded, boxes, flips, labels = zip(*batch)
    return (torch.as_tensor(indices, dtype=torch.long), list(encoded), torch.as_tensor(boxes, dtype=torch.long),
            torch.as_tensor(flips, dtype=torch.bool), torch.as_tensor(labels, dtype=torch.long))
