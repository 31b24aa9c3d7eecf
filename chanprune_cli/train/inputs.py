"""Where the training batches come from: the input path of a run, chosen once.

* tensor path (small images, `data.tensorcache`): the images live on the device as one tensor,
  decoded once (and cached on disk for image folders); each batch is gathered, cropped, flipped
  and normalised there. Loader workers only draw the crop offsets and flips, with each sample's
  own seeded generator, so the batches equal the loader path's bit for bit (same seed, same
  model); nothing is decoded per step.
* loader path (large images, or `--no-tensor-cache`): items decoded and augmented in loader
  workers, pinned memory, prefetching.
* device-decode path (`--device-decode`, large JPEG image folders, `data.devicejpeg`): workers
  read the files' bytes and draw the loader path's crops and flips; each batch is decoded,
  cropped, resized and flipped on the device.

Both serve the whole run from one loader (`sampling.RunBatches`): workers start once and prefetch
across epoch ends. `--workers` defaults to `default_workers`.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch.utils.data import DataLoader

from ..data.devicejpeg import DeviceJpegDecoder, device_jpeg_problem
from ..data.loaders import ignore_stop_signals, iterate_with_workers
from ..data.tensorcache import TensorImages, tensor_images, tensor_path_problem
from ..errors import UserError
from ..support import distributed as D
from .sampling import KeyedDataset, KeyedDraws, KeyedEncoded, RunBatches, collate_draws, collate_encoded, collate_labels

__all__ = ["TrainInputs", "default_workers", "tensor_images_for", "usable_cpus"]

_MAX_AUTO_WORKERS = 8
_PREFETCH = 4  # batches per worker in flight: hides uneven decode times


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity mask where the platform has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def default_workers(device: torch.device) -> int:
    """Loader processes when `--workers` is not given: on a GPU, one per spare CPU up to 8 (the
    model runs elsewhere, so the CPUs are free to feed it); on the CPU none, since training
    already keeps every core busy and a worker would only take cores from it."""
    if device.type != "cuda":
        return 0
    return max(0, min(_MAX_AUTO_WORKERS, usable_cpus() - 1))


def tensor_images_for(dataset: Any, *, device: torch.device, workers: int, wanted: bool | None,
                      role: str) -> TensorImages | None:
    """`dataset` as a `TensorImages` on `device`, or None for the loader path. `wanted` None:
    whenever the data set allows it; True: required (UserError saying why not); False: never."""
    if wanted is False:
        return None
    problem = tensor_path_problem(dataset)
    if problem is not None:
        if wanted:
            raise UserError(f"--tensor-cache: the {role} data cannot be held as one tensor: {problem}; "
                            "drop --tensor-cache")
        return None
    return tensor_images(dataset, workers=workers).to(device)


class TrainInputs:
    """The batches of one run on the device: `batches(start, stop)` yields (inputs, labels) for the
    global steps start..stop-1 (this rank's share of each global batch), drawn from the samples
    `indices` (default: all)."""

    def __init__(self, dataset: Any, *, batch_size: int, steps_per_epoch: int, seed: int, workers: int,
                 device: torch.device, env: D.DistEnv, tensor: bool | None, device_decode: bool = False,
                 indices: Sequence[int] | None = None) -> None:
        self.dataset, self.indices = dataset, indices
        self.batch_size, self.steps_per_epoch, self.seed = batch_size, steps_per_epoch, seed
        self.workers, self.device, self.env = workers, device, env
        self.decoder: DeviceJpegDecoder | None = None
        if device_decode:
            if tensor:
                raise UserError("--device-decode and --tensor-cache are two input paths; give one")
            problem = device_jpeg_problem(dataset)
            if problem is not None:
                raise UserError(f"--device-decode: the training data cannot be decoded on the device: {problem}; "
                                "drop --device-decode")
            self.decoder = DeviceJpegDecoder(dataset, device)
            tensor = False
        self.images = tensor_images_for(dataset, device=device, workers=workers, wanted=tensor, role="training")

    @property
    def kind(self) -> str:
        return "tensor" if self.images is not None else "device-decode" if self.decoder is not None else "loader"

    def _sampler(self, start: int, stop: int) -> RunBatches:
        n = len(self.indices) if self.indices is not None else len(self.dataset)
        return RunBatches(n, self.batch_size, self.steps_per_epoch, seed=self.seed, start=start, stop=stop,
                          rank=self.env.rank, world=self.env.world_size, indices=self.indices)

    def _loader(self, dataset: Any, sampler: RunBatches, collate: Any, workers: int) -> Iterator[Any]:
        loader = DataLoader(dataset, batch_sampler=sampler, num_workers=workers, collate_fn=collate,
                            pin_memory=self.device.type == "cuda",
                            worker_init_fn=ignore_stop_signals if workers > 0 else None,
                            prefetch_factor=_PREFETCH if workers > 0 else None)
        return iterate_with_workers(loader)

    def batches(self, start: int, stop: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        sampler = self._sampler(start, stop)
        images = self.images
        if self.decoder is not None:
            for indices, encoded, boxes, flips, labels in self._loader(KeyedEncoded(self.dataset), sampler,
                                                                       collate_encoded, self.workers):
                yield self.decoder.batch(indices, encoded, boxes, flips), labels.to(self.device, non_blocking=True)
            return
        if images is None:
            for x, y in self._loader(KeyedDataset(self.dataset), sampler, collate_labels, self.workers):
                yield x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
            return
        form = images.form
        if not form.augment:  # nothing to draw: the indices alone, in this process
            for batch in sampler:
                yield images.batch(torch.tensor([i for _, i in batch], dtype=torch.long))
            return
        draws = KeyedDraws(self.dataset, form.pad, form.flip)
        for indices, crops in self._loader(draws, sampler, collate_draws, self.workers):
            yield images.batch(indices, crops)
