"""Grayscale images held in memory as an N×H×W tensor (MNIST IDX files, scikit-learn digits).

Owns turning one stored image into a normalised C×H×W tensor: scaling, resizing, 1 → 3 channel
expansion and the seeded train-time augmentation.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import UserError
from .base import SMALL_IMAGE_MAX, ChanpruneDataset, pad_for
from .stats import resolve_stats

__all__ = ["TensorImageDataset"]


class TensorImageDataset(ChanpruneDataset):
    """Images held in memory as an N×H×W tensor (MNIST IDX, sklearn digits)."""

    def __init__(
        self,
        display: str,
        kind: str,
        images: Tensor,
        labels: Tensor,
        classes: list[str],
        *,
        scale: float,
        default_stats: tuple[Sequence[float], Sequence[float]],
        input_shape: tuple[int, int, int] | None,
        mean: Sequence[float] | str | None,
        std: Sequence[float] | str | None,
        train: bool,
        flip: bool,
    ) -> None:
        super().__init__(display)
        self.kind = kind
        self.images = images
        self.targets = [int(v) for v in labels.tolist()]
        self.classes = classes
        native = (1, int(images.shape[1]), int(images.shape[2]))
        if input_shape is None:
            input_shape = native
        if input_shape[0] not in (1, 3):
            raise UserError(f"{display} is grayscale; it can be loaded with 1 or 3 channels, not {input_shape[0]}")
        self.input_shape = input_shape
        self.train = train
        self._scale = scale
        self._flip_ok = flip  # digits are not mirror-symmetric: flipping would teach wrong classes
        self._native_hw = native[1:]
        self._set_stats(*resolve_stats(mean, std, input_shape[0], default_stats))

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        c, h, w = self.input_shape
        x = self.images[index].to(torch.float32).mul(self._scale).unsqueeze(0)
        big = max(h, w) > SMALL_IMAGE_MAX
        if self.train and big:
            left, top, cw, ch = self._rrc_box(x.shape[-1], x.shape[-2])
            x = x[..., top : top + ch, left : left + cw]
        if tuple(x.shape[-2:]) != (h, w):
            x = F.interpolate(x.unsqueeze(0), size=(h, w), mode="bilinear", antialias=True,
                              align_corners=False).squeeze(0)
        if self.train:
            if not big:
                x = self._pad_crop(x, pad_for(h, w))
            if self._flip_ok:
                x = self._flip(x)
        if c == 3:
            x = x.expand(3, h, w)
        return self._normalize(x), self.targets[index]
