"""Small images held as one tensor, decoded once, augmented per batch where the model runs.

The tensor input path of fine-tuning: a data set whose items are a crop and flip of a stored image
(`ChanpruneDataset.tensor_form`: images up to `SMALL_IMAGE_MAX` px per side) is read once into an
N×C×H×W tensor of its images before augmentation (uint8 for image files, float32 for in-memory
arrays), moved to the device, and each batch is gathered, padded-and-cropped, flipped and
normalised there (`TensorImages.batch`). Given the same crop offsets and flips, a batch is the
same values, bit for bit, as the data set's own items: the trainer draws them with each item's
own seeded generator (`ChanpruneDataset.crop_flip_draws`), so both paths train the same model.

Image folders are decoded once into the cache folder (`$XDG_CACHE_HOME/chanprune/tensors/`),
keyed by the files' content, the input shape, the colour mode and the Pillow version (a decoder
upgrade may change pixels); a (path, size, mtime, inode) memo skips re-hashing unchanged files,
as the archive cache does. Writes are atomic (temp file, then rename). In-memory sources (digits,
MNIST, NumPy arrays) are not written to disk.
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from ..support.progress import progress_bar
from .archive import cache_root
from .base import TensorForm

__all__ = ["MAX_TENSOR_BYTES", "TensorImages", "files_key", "tensor_images", "tensor_path_problem"]

MAX_TENSOR_BYTES = 4 << 30  # larger data sets are read item by item (loader workers)
_FORMAT = "chanprune-tensor-images-1"
_KEY_CHARS = 32


def _pil_version() -> str:
    import PIL

    return str(PIL.__version__)


def files_key(paths: Sequence[str], input_shape: Sequence[int], mode: str) -> str:
    """Content key of the images `paths` decoded to `input_shape` in colour `mode`.

    A memo keyed by every file's (path, size, mtime, inode) avoids reading the files again when
    nothing changed; otherwise every file is hashed (its bytes, in order)."""
    header = f"{_FORMAT}\0{tuple(input_shape)}\0{mode}\0pillow {_pil_version()}\0{len(paths)}\0"
    stat_digest = hashlib.sha256(header.encode())
    for p in paths:
        st = os.stat(p)
        stat_digest.update(f"{os.path.abspath(p)}\0{st.st_size}\0{st.st_mtime_ns}\0{st.st_ino}\0".encode())
    memo = _folder() / "by-stat" / stat_digest.hexdigest()[:_KEY_CHARS]
    try:
        key = memo.read_text(encoding="ascii").strip()
    except (OSError, UnicodeDecodeError):
        key = ""
    if re.fullmatch(r"[0-9a-f]{64}", key):
        return key
    content = hashlib.sha256(header.encode())
    for p in paths:
        with open(p, "rb") as fh:
            content.update(hashlib.sha256(fh.read()).digest())
    key = content.hexdigest()
    _write_atomic(memo, lambda fh: fh.write(key.encode("ascii")))
    return key


def _folder() -> Path:
    return cache_root() / "tensors"


def _write_atomic(path: Path, write: Any) -> None:
    """Best effort: the cache only saves work, so a folder that cannot be written is no error."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as fh:
                write(fh)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    except OSError:
        pass


class _RawItems(Dataset[Tensor]):
    def __init__(self, base: Any) -> None:
        self.base = base

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int) -> Tensor:
        return self.base.raw_item(index)


def tensor_path_problem(dataset: Any) -> str | None:
    """Why `dataset` cannot be held as one tensor (None: it can)."""
    form_of = getattr(dataset, "tensor_form", None)
    if not callable(form_of) or form_of() is None:
        return "its items are not crops of stored small images (the tensor path takes images up to 64 px)"
    c, h, w = dataset.input_shape
    itemsize = 1 if getattr(dataset, "kind", "") == "imagefolder" else 4
    size = len(dataset) * c * h * w * itemsize
    if size > MAX_TENSOR_BYTES:
        return f"its images take {size / (1 << 30):.1f} GiB as a tensor, over the {MAX_TENSOR_BYTES >> 30} GiB limit"
    return None


class TensorImages:
    """Every image of a data set before augmentation, and the per-batch crop, flip and
    normalisation that turn a batch of them into model inputs (on whatever device they live)."""

    def __init__(self, images: Tensor, targets: Tensor, form: TensorForm) -> None:
        self.images = images  # [N, C, H, W]
        self.targets = targets  # [N] int64
        self.form = form
        self._offset = form.offset.to(images.device, torch.float32).view(1, -1, 1, 1)
        self._divisor = form.divisor.to(images.device, torch.float32).view(1, -1, 1, 1)

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def device(self) -> torch.device:
        return self.images.device

    def to(self, device: torch.device) -> TensorImages:
        """A copy on `device` (one transfer of the whole tensor)."""
        if device.type == "cuda":
            images = self.images.pin_memory().to(device, non_blocking=True)
        else:
            images = self.images.to(device)
        return TensorImages(images, self.targets.to(device), self.form)

    def batch(self, indices: Tensor, draws: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Normalised float32 inputs [B, C, H, W] and labels [B] of the items `indices`; `draws`
        [B, 3] (top, left, flip) crop and flip them as `crop_flip` does an item (None: as stored)."""
        indices = indices.to(self.device, non_blocking=True)
        x = self.images.index_select(0, indices)
        if draws is not None:
            draws = draws.to(self.device, non_blocking=True)
            pad = self.form.pad
            b, c, h, w = x.shape
            if pad:
                x = F.pad(x, (pad, pad, pad, pad))
            # The crop, and the flip folded into the column order, as two gathers for the batch.
            rows = draws[:, 0:1] + torch.arange(h, device=x.device)
            ahead = torch.arange(w, device=x.device)
            cols = draws[:, 1:2] + torch.where(draws[:, 2:3].bool(), w - 1 - ahead, ahead)
            x = x.gather(2, rows[:, None, :, None].expand(b, c, h, x.shape[3]))
            x = x.gather(3, cols[:, None, None, :].expand(b, c, h, w))
        return x.float().sub_(self._offset).div_(self._divisor), self.targets.index_select(0, indices)


def tensor_images(dataset: Any, *, workers: int = 0) -> TensorImages:
    """`dataset`'s images as one tensor (on the CPU), from the cache folder when it holds them;
    decoded with `workers` loader processes otherwise (and then cached when the data set has a
    `cache_key`). The caller checks `tensor_path_problem` first."""
    form = dataset.tensor_form()
    n = len(dataset)
    c, h, w = dataset.input_shape
    targets = torch.as_tensor(list(dataset.targets), dtype=torch.long)
    key = dataset.cache_key()
    path = _folder() / f"{key[:_KEY_CHARS]}.npy" if key else None
    if path is not None:
        try:
            array = np.load(path, allow_pickle=False)
            if array.shape == (n, c, h, w) and array.dtype == np.uint8:
                return TensorImages(torch.from_numpy(array), targets, form)
        except (OSError, ValueError):
            pass  # absent or damaged: decoded again below
    loader = DataLoader(_RawItems(dataset), batch_size=256, num_workers=workers, collate_fn=torch.stack)
    images: Tensor | None = None
    done = 0
    with progress_bar("rate", eta=True) as bar:
        task = bar.add_task(f"decoding {getattr(dataset, 'source', 'the data')} once", total=n, rate="")
        for chunk in loader:
            if images is None:
                images = torch.empty((n, c, h, w), dtype=chunk.dtype)
            images[done:done + chunk.shape[0]] = chunk
            done += chunk.shape[0]
            bar.update(task, advance=chunk.shape[0])
    assert images is not None
    if path is not None:
        array = images.numpy()
        _write_atomic(path, lambda fh: np.save(fh, array, allow_pickle=False))
    return TensorImages(images, targets, form)
