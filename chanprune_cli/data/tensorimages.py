"""Images held in memory as an N×H×W (grayscale) or N×C×H×W tensor (MNIST IDX files,
scikit-learn digits, NumPy arrays).

Owns turning one stored image into a normalised C×H×W tensor: scaling, resizing, 1 ↔ 3 channel
conversion and the seeded train-time augmentation.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import UserError
from .base import SMALL_IMAGE_MAX, ChanpruneDataset, DataWarning, TensorForm, crop_flip, gray_to_color, pad_for, resized
from .stats import resolve_stats

__all__ = ["TensorImageDataset"]


# ITU-R 601-2 luma, as PIL's RGB -> L conversion (image folders convert with PIL).
_LUMA = torch.tensor([0.299, 0.587, 0.114]).view(3, 1, 1)


class TensorImageDataset(ChanpruneDataset):
    """Images held in memory as an N×H×W (grayscale) or N×C×H×W tensor, C = 1 or 3."""

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
        channels = 1 if images.ndim == 3 else int(images.shape[1])
        native = (channels, int(images.shape[-2]), int(images.shape[-1]))
        if input_shape is None:
            input_shape = native
        if input_shape[0] not in (1, 3):
            kind_text = "grayscale" if channels == 1 else "color"
            raise UserError(f"{display} is {kind_text}; it can be loaded with 1 or 3 channels, not {input_shape[0]}")
        if channels == 3 and input_shape[0] == 1:
            warnings.warn(DataWarning(
                f"images in {display} are color but the model takes 1 channel; converting them to grayscale "
                "(check --data if the model expects color images)"), stacklevel=3)
        if channels == 1 and input_shape[0] == 3:
            warnings.warn(DataWarning(gray_to_color(display)), stacklevel=3)
        if native[1:] != input_shape[1:]:  # stored at their own size: another size is most likely other data
            warnings.warn(DataWarning(resized(display, native[1:], input_shape[1:])), stacklevel=3)
        self.input_shape = input_shape
        self.train = train
        self._scale = scale
        self._flip_ok = flip  # digits are not mirror-symmetric: flipping would teach wrong classes
        self._native_hw = native[1:]
        self._set_stats(*resolve_stats(mean, std, input_shape[0], default_stats))

    def _scaled(self, index: int) -> Tensor:
        x = self.images[index].to(torch.float32).mul(self._scale)
        return x.unsqueeze(0) if x.ndim == 2 else x

    def _resized(self, x: Tensor) -> Tensor:
        h, w = self.input_shape[1:]
        if tuple(x.shape[-2:]) != (h, w):
            x = F.interpolate(x.unsqueeze(0), size=(h, w), mode="bilinear", antialias=True,
                              align_corners=False).squeeze(0)
        return x

    def _channels(self, x: Tensor) -> Tensor:
        c, h, w = self.input_shape
        if c == 3 and x.shape[0] == 1:
            return x.expand(3, h, w)
        if c == 1 and x.shape[0] == 3:
            return (x * _LUMA).sum(0, keepdim=True)
        return x

    def _big(self) -> bool:
        return max(self.input_shape[1:]) > SMALL_IMAGE_MAX

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        if self.train and self._big():
            x = self._scaled(index)
            left, top, cw, ch = self._rrc_box(x.shape[-1], x.shape[-2])
            x = self._resized(x[..., top : top + ch, left : left + cw])
            if self._flip_ok:
                x = self._flip(x)
            x = self._channels(x)
        else:
            # Channel conversion before the crop and flip gives the same values as after it (it
            # acts per pixel, and the zero padding stays zero), so `raw_item` can store it.
            x = self.raw_item(index)
            if self.train:
                pad = pad_for(*self.input_shape[1:])
                x = crop_flip(x, pad, *self.crop_flip_draws(pad, self._flip_ok))
        return self._normalize(x), self.targets[index]

    def tensor_form(self) -> TensorForm | None:
        if self._big():
            return None
        return TensorForm(augment=self.train, pad=pad_for(*self.input_shape[1:]), flip=self._flip_ok,
                          offset=self._mean_t.flatten(), divisor=self._std_t.flatten())

    def raw_item(self, index: int) -> Tensor:
        return self._channels(self._resized(self._scaled(index)))
