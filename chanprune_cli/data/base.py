"""The data set base class every source builds on, and the warning category for skipped data.

Owns the attributes every data set carries (`classes`, `targets`, `input_shape`, `mean`, `std`,
`skipped`, ...), per-data-set normalisation, the seeded augmentation primitives (pad-and-crop,
flip, RandomResizedCrop box) that draw only from the data set's own generator, and what the tensor
input path (`tensorcache`) asks of a data set (`tensor_form`, `raw_item`, `cache_key`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset

__all__ = ["SMALL_IMAGE_MAX", "ChanpruneDataset", "DataWarning", "TensorForm", "crop_flip", "gray_to_color", "pad_for",
           "resized"]

SMALL_IMAGE_MAX = 64  # up to this many pixels per side: pad-and-crop augmentation (CIFAR style)


class DataWarning(UserWarning):
    """Something about the data deserves a word (files skipped, classes that may not be the model's,
    images converted to the model's input, random data where real data matters); the run goes on."""


def gray_to_color(display: str) -> str:
    """The warning for grayscale images given to a model that takes 3 channels."""
    return (f"images in {display} are grayscale but the model takes 3 channels; repeating the grey channel "
            "(check --data if the model expects color images)")


def resized(display: str, stored: tuple[int, int], size: tuple[int, int]) -> str:
    """The warning for images stored at (H, W) `stored` resized to the model's `size`."""
    return (f"images in {display} are {stored[0]}x{stored[1]} but the model takes {size[0]}x{size[1]}; resizing them "
            "(check --data if the model expects images of another size, or pass --input-shape)")


@dataclass(frozen=True)
class TensorForm:
    """How a data set's items come from one tensor of its images (the tensor input path,
    `tensorcache`): item i is `raw_item(i)`, cropped and flipped by `crop_flip` with the draws of
    `crop_flip_draws` when `augment`, then normalised as (x - offset) / divisor per channel."""

    augment: bool
    pad: int
    flip: bool
    offset: Tensor  # [C]
    divisor: Tensor  # [C]


class ChanpruneDataset(Dataset[tuple[Tensor, int]]):
    """Common attributes of every data set `open_dataset` returns."""

    kind: str = "data"
    # Whether labels number the class names in sorted order (folders), rather than coming with the
    # data: only then may a class count that differs from the model's outputs mean shifted labels.
    labels_by_name: bool = False

    def __init__(self, source: str) -> None:
        self.source = source
        self.classes: list[str] = []
        self.targets: list[int] = []
        self.input_shape: tuple[int, int, int] = (0, 0, 0)
        self.mean: tuple[float, ...] = ()
        self.std: tuple[float, ...] = ()
        self.train = False
        self.skipped = 0
        self.skipped_files: list[str] = []
        self._seed = 0
        self._generator: torch.Generator | None = None
        self._mean_t = torch.zeros(0)
        self._std_t = torch.ones(0)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:  # pragma: no cover - abstract
        raise NotImplementedError

    def reseed(self, seed: int) -> None:
        """Restart the augmentation random stream (called per loader and per worker)."""
        self._seed = int(seed)
        self._generator = None

    def __getstate__(self) -> dict[str, Any]:
        # Generators are process-local; each worker rebuilds its own from the seed.
        state = self.__dict__.copy()
        state["_generator"] = None
        return state

    @property
    def _rng(self) -> torch.Generator:
        if self._generator is None:
            self._generator = torch.Generator()
            self._generator.manual_seed(self._seed & 0xFFFF_FFFF_FFFF_FFFF)
        return self._generator

    def _set_stats(self, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        self.mean, self.std = mean, std
        self._mean_t = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
        self._std_t = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)

    def _normalize(self, x: Tensor) -> Tensor:
        return (x - self._mean_t) / self._std_t

    # Augmentation helpers; they draw only from this data set's own generator so that runs are
    # reproducible with workers=0 (where torch's global RNG would be shared with everything else).
    def _randint(self, high: int) -> int:
        return int(torch.randint(0, high, (1,), generator=self._rng).item())

    def _uniform(self, low: float, high: float) -> float:
        return low + (high - low) * float(torch.rand(1, generator=self._rng).item())

    def crop_flip_draws(self, pad: int, flip: bool) -> tuple[int, int, bool]:
        """One item's pad-and-crop offsets (top, left) and flip, from this data set's generator."""
        top, left = self._randint(2 * pad + 1), self._randint(2 * pad + 1)
        return top, left, flip and self._flip_draw()

    # The tensor input path; data sets whose items are not a crop and flip of a stored image keep
    # these defaults and are always read item by item.
    def tensor_form(self) -> TensorForm | None:
        """How items come from `raw_item` (None: they do not, e.g. large or synthetic images)."""
        return None

    def raw_item(self, index: int) -> Tensor:
        """Item `index` before augmentation and normalisation (see `tensor_form`). Only called when
        `tensor_form()` returns a form, so only data sets that return one implement it."""
        raise NotImplementedError(f"{type(self).__name__} returns a tensor_form but has no raw_item")

    def cache_key(self) -> str | None:
        """A key of the raw images' content for the on-disk tensor cache (None: not cached on disk)."""
        return None

    def _flip_draw(self) -> bool:
        """Whether to mirror an item: one draw from this data set's generator."""
        return self._uniform(0.0, 1.0) < 0.5

    def _flip(self, x: Tensor) -> Tensor:
        return x.flip(-1) if self._flip_draw() else x

    def _rrc_box(self, width: int, height: int) -> tuple[int, int, int, int]:
        """RandomResizedCrop box (left, top, w, h): scale 0.08–1, aspect 3/4–4/3, as torchvision."""
        area = width * height
        log_lo, log_hi = math.log(3 / 4), math.log(4 / 3)
        for _ in range(10):
            target = area * self._uniform(0.08, 1.0)
            aspect = math.exp(self._uniform(log_lo, log_hi))
            w = int(round(math.sqrt(target * aspect)))
            h = int(round(math.sqrt(target / aspect)))
            if 0 < w <= width and 0 < h <= height:
                return self._randint(width - w + 1), self._randint(height - h + 1), w, h
        ratio = width / height  # fallback: central crop clamped to the aspect range
        if ratio < 3 / 4:
            w, h = width, int(round(width / (3 / 4)))
        elif ratio > 4 / 3:
            w, h = int(round(height * (4 / 3))), height
        else:
            w, h = width, height
        return (width - w) // 2, (height - h) // 2, w, h


def crop_flip(x: Tensor, pad: int, top: int, left: int, flipped: bool) -> Tensor:
    """Zero-pad by `pad`, crop the input size at (top, left), then mirror when `flipped`."""
    h, w = x.shape[-2:]
    x = F.pad(x, (pad, pad, pad, pad))[..., top : top + h, left : left + w]
    return x.flip(-1) if flipped else x


def pad_for(h: int, w: int) -> int:
    """Pad-and-crop shift for an h×w input."""
    # 4 px is the CIFAR recipe at 32 px; tiny inputs (8×8 digits) get a proportionally smaller shift.
    side = min(h, w)
    return 4 if side >= 32 else max(1, side // 8)
