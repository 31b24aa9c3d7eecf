"""Arrays saved with NumPy: a `.npz` of images (or 1-D signals) and labels, or a `.npy` of them alone.

Owns the accepted keys and layouts and their checks:

* `.npz` (`np.savez` / `np.savez_compressed`): images under `images` (or `x`), integer labels
  under `labels` (or `y`), optionally the class names under `classes` (label i is `classes[i]`);
* `.npy` (`np.save`): images only, one class (unlabelled calibration data);
* images N×H×W (grayscale), N×H×W×C (channels last, as NumPy and PIL hold them) or N×C×H×W, with
  C = 1 or 3; uint8 (0-255) or floats in [0, 1];
* 1-D signals N×L or N×C×L (audio frames, sensor series) for a model whose input shape is L or C,L
  (or, with no input shape known, an N×L array): any numbers, used as given (`signals.py`).

Read with `allow_pickle=False`: an array file never runs code.
"""

from __future__ import annotations

import warnings
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import UserError
from .base import DataWarning
from .signals import SignalDataset
from .stats import GRAY_MEAN, GRAY_STD, IMAGENET_MEAN, IMAGENET_STD
from .tensorimages import TensorImageDataset

__all__ = ["ARRAY_SUFFIXES", "IMAGE_KEYS", "LABEL_KEYS", "is_array_file", "open_arrays"]

ARRAY_SUFFIXES = (".npz", ".npy")
IMAGE_KEYS = ("images", "x")
LABEL_KEYS = ("labels", "y")
_LAYOUTS = "N×H×W, N×H×W×C or N×C×H×W with C = 1 or 3"
_MAX_INFLATION = 100  # compressed image arrays shrink a few times, never a hundredfold
_INFLATION_FLOOR = 256 * 1024 * 1024


def is_array_file(path: Path) -> bool:
    """Whether `path` is named like a NumPy array file this module reads."""
    return path.name.lower().endswith(ARRAY_SUFFIXES)


def _check_inflation(path: Path, display: str) -> None:
    """Refuse a `.npz` declaring far more content than the file holds (a zip bomb)."""
    try:
        with zipfile.ZipFile(path) as zf:
            declared = sum(max(int(info.file_size), 0) for info in zf.infolist())
    except (zipfile.BadZipFile, OSError, ValueError, EOFError, NotImplementedError, OverflowError) as exc:
        raise UserError(f"cannot read {display} as a .npz archive ({exc}); re-create it with numpy.savez") from None
    size = path.stat().st_size
    if declared > max(_MAX_INFLATION * size, _INFLATION_FLOOR):
        raise UserError(f"{display} declares {declared / 2**20:.0f} MiB of arrays in a {size / 2**20:.1f} MiB file; "
                        "refusing to unpack it (re-create it with numpy.savez)")


def _load(path: Path, display: str) -> dict[str, np.ndarray]:
    if path.name.lower().endswith(".npz"):
        _check_inflation(path, display)
    try:
        loaded = np.load(path, allow_pickle=False)
        if isinstance(loaded, np.ndarray):
            return {"images": loaded}
        with loaded:
            return {key: loaded[key] for key in loaded.files}
    except ValueError as exc:  # allow_pickle=False refuses object arrays with a ValueError
        raise UserError(f"{display} holds arrays numpy cannot read without unpickling ({exc}); "
                        "re-save it with plain numeric arrays (and class names as a string array)") from None
    except (OSError, EOFError, zipfile.BadZipFile) as exc:
        raise UserError(f"cannot read {display} ({exc}); it is damaged or not a NumPy file, re-create it") from None


def _pick(arrays: dict[str, np.ndarray], keys: tuple[str, ...], display: str, what: str) -> np.ndarray | None:
    found = [k for k in keys if k in arrays]
    if len(found) > 1:
        raise UserError(f"{display} has both {found[0]!r} and {found[1]!r}; remove one, so that one array holds the {what}")
    return arrays[found[0]] if found else None


def _as_nchw(images: np.ndarray, display: str) -> torch.Tensor:
    """The images as an N×H×W or N×C×H×W tensor (a view where the layout allows)."""
    if images.dtype != np.uint8 and not np.issubdtype(images.dtype, np.floating):
        raise UserError(f"{display}: images are {images.dtype}; use uint8 (0-255) or floats in [0, 1]")
    if images.ndim == 3:
        return torch.from_numpy(np.ascontiguousarray(images))
    if images.ndim == 4 and images.shape[-1] in (1, 3):  # channels last (images 1 or 3 pixels wide do not occur)
        return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2)
    if images.ndim == 4 and images.shape[1] in (1, 3):
        return torch.from_numpy(np.ascontiguousarray(images))
    raise UserError(f"{display}: images have shape {images.shape}; expected {_LAYOUTS} (1-D signals N×L or N×C×L "
                    "need --input-shape L or C,L)")


def _signals(values: np.ndarray, display: str, labels: torch.Tensor, classes: list[str], **kw: Any) -> SignalDataset:
    """N×L or N×C×L numbers as 1-D signals, used as given."""
    if values.ndim not in (2, 3) or not (np.issubdtype(values.dtype, np.floating) or np.issubdtype(values.dtype, np.integer)):
        raise UserError(f"{display}: 1-D signals must be numbers of shape N×L or N×C×L, got {values.dtype} of shape "
                        f"{values.shape}; check --data or --input-shape")
    return SignalDataset(display, torch.from_numpy(np.ascontiguousarray(values)), labels, classes, **kw)


def open_arrays(path: Path, display: str, *, input_shape: tuple[int, ...] | None, mean: Any, std: Any,
                train: bool) -> TensorImageDataset | SignalDataset:
    """A `.npz`/`.npy` file (see the module docstring) as a data set."""
    arrays = _load(path, display)
    images = _pick(arrays, IMAGE_KEYS, display, "images")
    if images is None:
        raise UserError(f"{display} has no images: put them under 'images' (or 'x'); it holds "
                        f"{', '.join(sorted(arrays)) or 'nothing'}")
    n = int(images.shape[0]) if images.ndim else 0
    if n == 0:
        raise UserError(f"{display} holds no images; check the file")
    labels = _pick(arrays, LABEL_KEYS, display, "labels")
    if labels is None:
        if path.name.lower().endswith(".npz"):
            raise UserError(f"{display} has images but no labels: put integer labels under 'labels' (or 'y'), "
                            "or save the images alone with numpy.save as unlabelled .npy data")
        labels = np.zeros(n, dtype=np.int64)
    if labels.ndim != 1 or labels.shape[0] != n or not np.issubdtype(labels.dtype, np.integer):
        raise UserError(f"{display}: labels must be {n} integers (one per image), got {labels.dtype} of shape "
                        f"{labels.shape}; fix the 'labels' array")
    if int(labels.min()) < 0:
        raise UserError(f"{display}: labels must be 0 or more, found {int(labels.min())}; fix the 'labels' array")
    names = arrays.get("classes")
    count = int(labels.max()) + 1
    if names is not None:
        if names.ndim != 1 or names.dtype.kind not in "US" or len(names) < count:
            raise UserError(f"{display}: 'classes' must be a string array naming every label (at least {count}); "
                            "fix it or leave it out")
        classes = [str(c) for c in names.tolist()]
    else:
        classes = [str(i) for i in range(count)]
    if (len(input_shape) < 3) if input_shape is not None else images.ndim == 2:
        return _signals(images, display, torch.from_numpy(labels.astype(np.int64)), classes,
                        input_shape=input_shape, mean=mean, std=std, train=train)
    tensor = _as_nchw(images, display)
    if images.dtype != np.uint8 and float(images.max()) > 1.5:
        warnings.warn(DataWarning(f"{display}: float images reach {float(images.max()):g}, but floats are read as "
                                  "0-1 (uint8 as 0-255); check --data, or divide them by 255"), stacklevel=3)
    channels = 1 if tensor.ndim == 3 else int(tensor.shape[1])
    scale = 1.0 / 255.0 if images.dtype == np.uint8 else 1.0
    stats = (GRAY_MEAN, GRAY_STD) if (input_shape[0] if input_shape else channels) == 1 else (IMAGENET_MEAN, IMAGENET_STD)
    return TensorImageDataset(display, "arrays", tensor, torch.from_numpy(labels.astype(np.int64)), classes,
                              scale=scale, default_stats=stats, input_shape=input_shape, mean=mean, std=std,
                              train=train, flip=True)
