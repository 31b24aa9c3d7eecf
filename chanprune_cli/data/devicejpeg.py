"""JPEG training images decoded where the model runs (nvJPEG on a GPU), for large images.

The loader path decodes and augments every image in loader workers, which bounds a GPU fine-tune
of large images by the CPUs. Here the workers only read each file's bytes and draw its
RandomResizedCrop box and flip (`ImageFolderDataset.resized_crop_draws`, the same draws the loader
path applies, seeded per item); the batch is decoded on the device by torchvision's `decode_jpeg`
(one call per batch: nvJPEG's batched decoder on CUDA) and each image is cropped, resized
(bilinear with antialiasing, rounded to whole pixel values as PIL's resize is) and flipped there.
The pixels differ from PIL's resampling by rounding (about one grey level); the crops and flips
are the loader path's, and a seed gives the same batches run after run. On CUDA each decode waits
for the work queued before it (see `DeviceJpegDecoder._decoded`), so decoding does not overlap the
previous step's kernels.

Opt-in (`finetune --device-decode`): whether it beats the loader path depends on the GPU, the
CPUs and the image sizes (`bench/gpu_check.py` measures both). torchvision deprecated its image
decoders in 0.29 in favour of TorchCodec; a torchvision without `decode_jpeg` gets a one-line error.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import UserError
from .base import SMALL_IMAGE_MAX

__all__ = ["DeviceJpegDecoder", "device_jpeg_problem", "encoded_item"]

_JPEG_SUFFIXES = (".jpg", ".jpeg", ".jpe", ".jfif")


def device_jpeg_problem(dataset: Any) -> str | None:
    """Why `dataset` cannot be decoded on the device (None: it can)."""
    from .imagefolder import ImageFolderDataset

    if not isinstance(dataset, ImageFolderDataset):
        return f"only image folders (or archives of them) are read as JPEG files, not {dataset.kind} data"
    if max(dataset.input_shape[1:]) <= SMALL_IMAGE_MAX:
        return (f"images of up to {SMALL_IMAGE_MAX} px are decoded once and held as one tensor instead "
                "(--tensor-cache, the default)")
    others = [p for p in dataset.paths if not p.lower().endswith(_JPEG_SUFFIXES)]
    if others:
        return f"{len(others)} of its {len(dataset.paths)} images are not JPEG files, e.g. {others[0]}"
    return None


def encoded_item(dataset: Any, index: int) -> tuple[Tensor, tuple[int, int, int, int], bool]:
    """Image `index`'s file bytes (uint8), its crop box (left, top, width, height) and flip: the
    data set's own draws when it augments, else the whole image unflipped."""
    with open(dataset.paths[index], "rb") as fh:
        data = torch.frombuffer(bytearray(fh.read()), dtype=torch.uint8)
    if dataset.train:
        box, flipped = dataset.resized_crop_draws(index)
        return data, box, flipped
    width, height = dataset.sizes[index]
    return data, (0, 0, width, height), False


def _decode_jpeg() -> Any:
    try:
        from torchvision.io import decode_jpeg
    except ImportError:
        raise UserError("--device-decode: this torchvision has no decode_jpeg (its image decoders were deprecated "
                        "in 0.29 and later removed); use torchvision <= 0.29 or drop --device-decode") from None
    return decode_jpeg


class DeviceJpegDecoder:
    """Turns a batch of `encoded_item`s into normalised N×C×H×W inputs on `device`."""

    def __init__(self, dataset: Any, device: torch.device) -> None:
        from torchvision.io import ImageReadMode

        self.paths: list[str] = dataset.paths
        self.device = device
        channels, height, width = dataset.input_shape
        self.size = (height, width)
        self.mode = ImageReadMode.GRAY if channels == 1 else ImageReadMode.RGB
        # (x - 255·mean) / (255·std), as the data set normalises its items
        self.offset = dataset._mean255.view(1, channels, 1, 1).to(device)
        self.divisor = dataset._std255.view(1, channels, 1, 1).to(device)
        self._decode = _decode_jpeg()

    def _decoded(self, indices: Sequence[int], encoded: list[Tensor]) -> list[Tensor]:
        cuda = self.device.type == "cuda"
        if cuda:
            # The CUDA decoder writes its outputs from a stream of its own without waiting for ours,
            # into memory the allocator may have recycled from tensors that queued kernels still
            # read (reported upstream): nothing of ours may be in flight while it runs, and its
            # outputs must be complete before our stream reads them.
            torch.cuda.current_stream(self.device).synchronize()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # torchvision 0.29's notice, once per call
            try:
                images = list(self._decode(encoded, mode=self.mode, device=self.device))
            except RuntimeError:
                images = None
            if images is not None:
                if cuda:
                    torch.cuda.synchronize(self.device)
                return images
            # the batch call does not say which image failed: find it, on the CPU
            for i, data in zip(indices, encoded):
                try:
                    self._decode(data, mode=self.mode)
                except RuntimeError as exc:
                    reason = str(exc).rsplit(", ", 1)[-1]
                    raise UserError(f"could not decode image {self.paths[i]}: {reason}") from None
            raise UserError(f"could not decode a batch of images on {self.device} (each decodes on the CPU); "
                            "drop --device-decode")

    def batch(self, indices: Tensor, encoded: list[Tensor], boxes: Tensor, flips: Tensor) -> Tensor:
        """Decode, crop each to its box, resize to the input size, flip, normalise."""
        images = self._decoded(indices.tolist(), encoded)
        out = torch.empty(len(images), self.offset.shape[1], *self.size, device=self.device)
        for k, (image, (left, top, width, height), flipped) in enumerate(zip(images, boxes.tolist(), flips.tolist())):
            crop = image[:, top:top + height, left:left + width].unsqueeze(0).float()
            resized = F.interpolate(crop, size=self.size, mode="bilinear", align_corners=False, antialias=True)[0]
            out[k] = resized.flip(-1) if flipped else resized
        return out.round_().clamp_(0, 255).sub_(self.offset).div_(self.divisor)
