"""MNIST IDX files: parsing, finding the files in a folder, and opening them as a data set.

Owns the IDX format (optionally gzipped), the `train-*` / `t10k-*` file naming, where in a folder
the files may sit (`raw/`, `MNIST/raw/`, one wrapping folder), and pairing images with labels.
"""

from __future__ import annotations

import gzip
import math
import re
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..errors import UserError
from .listing import visible_subdirs
from .stats import MNIST_MEAN, MNIST_STD
from .tensorimages import TensorImageDataset

__all__ = ["IDX_RE", "find_idx", "labels_for", "open_idx"]

_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
IDX_RE = re.compile(r"^(train|t10k)-(images|labels)[-.]idx([13])-ubyte(\.gz)?$", re.IGNORECASE)


def _read_idx(path: Path) -> Tensor:
    """Parse an IDX file (optionally gzipped): magic 00 00 <type> <ndim>, big-endian dims, data."""
    try:
        if path.name.lower().endswith(".gz"):
            with gzip.open(path, "rb") as fh:
                raw = fh.read()
        else:
            raw = path.read_bytes()
    except (OSError, EOFError, zlib.error) as exc:
        raise UserError(f"cannot read IDX file {path}: {exc}") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES or raw[3] == 0:
        raise UserError(f"{path} is not an IDX file (bad magic number)")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise UserError(f"{path}: IDX header is truncated")
    dims = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    expected = math.prod(dims) * dtype.itemsize
    if len(raw) - header != expected:
        raise UserError(
            f"{path}: IDX header says shape {dims} ({expected} bytes) but the file has "
            f"{len(raw) - header} data bytes"
        )
    array = np.frombuffer(raw, dtype=dtype, offset=header).reshape(dims)
    return torch.from_numpy(array.astype(dtype.newbyteorder("="), copy=True))


def find_idx(directory: Path) -> dict[str, dict[str, Path]]:
    """split ("train"/"t10k") → {"images": path, "labels": path} for IDX files in `directory`."""
    found: dict[str, dict[str, Path]] = {}
    folders = [directory, directory / "raw", directory / "MNIST" / "raw"]
    subdirs = visible_subdirs(directory)
    if len(subdirs) == 1:  # e.g. an archive holding a single `mnist/` folder
        folders += [subdirs[0], subdirs[0] / "raw"]
    for folder in folders:
        if not folder.is_dir():
            continue
        for entry in sorted(folder.iterdir()):
            m = IDX_RE.match(entry.name)
            if m and entry.is_file():
                found.setdefault(m.group(1).lower(), {}).setdefault(m.group(2).lower(), entry)
        if found:
            break
    return found


def labels_for(images: Path) -> Path:
    """The labels file beside an images file (gzipped or not); UserError when there is none."""
    name = re.sub(r"images([-.])idx3", r"labels\1idx1", images.name, flags=re.IGNORECASE)
    for candidate in (name, name[:-3] if name.lower().endswith(".gz") else name + ".gz"):
        if (images.parent / candidate).is_file():
            return images.parent / candidate
    raise UserError(f"found MNIST images {images} but not the labels file {images.parent / name}")


def open_idx(images_path: Path, labels_path: Path, display: str, **kw: Any) -> TensorImageDataset:
    """An images/labels IDX pair as a data set; `kw` are the TensorImageDataset options."""
    images = _read_idx(images_path)
    labels = _read_idx(labels_path)
    if images.ndim != 3:
        raise UserError(f"{images_path}: expected N×H×W images, got shape {tuple(images.shape)}")
    if labels.ndim != 1:
        raise UserError(f"{labels_path}: expected a vector of labels, got shape {tuple(labels.shape)}")
    if images.shape[0] != labels.shape[0]:
        raise UserError(
            f"{images_path} has {images.shape[0]} images but {labels_path} has {labels.shape[0]} labels"
        )
    if labels.numel() and int(labels.min()) < 0:
        raise UserError(f"{labels_path}: negative labels")
    if images.shape[0] == 0:
        raise UserError(f"no images in {images_path}")
    n_classes = max(10, int(labels.max()) + 1)
    scale = 1.0 / 255.0 if images.dtype == torch.uint8 else 1.0
    return TensorImageDataset(
        display, "mnist", images, labels.long(), [str(i) for i in range(n_classes)],
        scale=scale, default_stats=(MNIST_MEAN, MNIST_STD), flip=False, **kw,
    )
