"""Datasets and loaders for calibration, evaluation and fine-tuning (DESIGN §6, §8).

`--data` accepts:

* an ImageFolder directory (`root/<class>/<image>`), or a directory holding one split folder
  (`root/test/<class>/<image>`);
* a `.tar` / `.tar.gz` / `.tgz` (also `.tar.bz2`, `.tar.xz`) of such a folder, extracted once into
  `$XDG_CACHE_HOME/chanprune/datasets/<content hash>/`;
* a directory of MNIST IDX files (`t10k-images-idx3-ubyte[.gz]` + labels, or `train-*`), or the
  images IDX file itself;
* `synthetic:CxHxW[:K[:N]]` — N (default 256) seeded standard-normal inputs, K (default 10) classes;
* `digits[:train|:test|:all]` — scikit-learn's bundled 8×8 digits, split 80/20 with a fixed seed.

Every dataset yields `(float tensor C×H×W, int label)` and carries `classes`, `num_classes`,
`targets`, `input_shape`, `mean`, `std`, `skipped` and `skipped_files` attributes.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import json
import math
import os
import posixpath
import random
import re
import shutil
import tarfile
import tempfile
import time
import warnings
import zlib
from collections.abc import Iterator, Sequence
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, RandomSampler

from ..errors import ChanpruneError, UserError

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)
# Grayscale image folders default to the channel average of the ImageNet statistics.
GRAY_MEAN: tuple[float] = (0.449,)
GRAY_STD: tuple[float] = (0.226,)
MNIST_MEAN: tuple[float] = (0.1307,)
MNIST_STD: tuple[float] = (0.3081,)

IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm", ".pbm"}
)
ARCHIVE_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz")

SYNTHETIC_DEFAULT_CLASSES = 10
SYNTHETIC_DEFAULT_LENGTH = 256
SYNTHETIC_SEED = 0
DIGITS_SPLIT_SEED = 0
DIGITS_TEST_FRACTION = 0.2
SMALL_IMAGE_MAX = 64  # up to this many pixels per side: pad-and-crop augmentation (CIFAR style)

ACCEPTED_FORMS = (
    "an ImageFolder directory (root/<class>/<image>), a .tar/.tar.gz/.tgz of one, "
    "a directory of MNIST IDX files, synthetic:CxHxW[:K[:N]], or digits[:train|:test|:all]"
)

_CACHE_MARKER = ".chanprune-extracted.json"
_HASH_PREFIX = 32  # hex characters of the sha256 used as the cache folder name
_STALE_TMP_SECONDS = 24 * 3600
# Python >= 3.11.4 / 3.12: the tarfile extraction filters; FilterError subclasses TarError.
_FilterError: type[Exception] = getattr(tarfile, "FilterError", tarfile.TarError)


class DataWarning(UserWarning):
    """Something in the data was skipped; the data set is still usable."""


# --------------------------------------------------------------------------- text helpers


def parse_floats(text: str, *, name: str = "value") -> tuple[float, ...]:
    """Parse "0.5,0.5,0.5" into floats; UserError naming `name` on bad text."""
    parts = [p.strip() for p in str(text).split(",")]
    if not parts or any(p == "" for p in parts):
        raise UserError(f"--{name} {text!r}: expected comma-separated numbers, e.g. 0.5,0.5,0.5")
    try:
        values = tuple(float(p) for p in parts)
    except ValueError:
        raise UserError(f"--{name} {text!r}: expected comma-separated numbers, e.g. 0.5,0.5,0.5") from None
    if not all(math.isfinite(v) for v in values):
        raise UserError(f"--{name} {text!r}: values must be finite numbers")
    return values


def parse_shape(text: str) -> tuple[int, int, int]:
    """Parse "3,32,32" (or "3x32x32") into a (C, H, W) tuple of positive ints."""
    parts = [p.strip() for p in re.split(r"[,xX×]", str(text).strip())]
    try:
        dims = tuple(int(p) for p in parts)
    except ValueError:
        dims = ()
    if len(dims) != 3 or any(d <= 0 for d in dims):
        raise UserError(f"input shape {text!r}: expected three positive integers C,H,W, e.g. 3,32,32")
    return dims  # type: ignore[return-value]


def _as_shape(value: Sequence[int] | str | None) -> tuple[int, int, int] | None:
    if value is None:
        return None
    if isinstance(value, str):
        return parse_shape(value)
    dims = tuple(int(v) for v in value)
    if len(dims) != 3 or any(d <= 0 for d in dims):
        raise UserError(f"input shape {tuple(value)}: expected three positive integers C,H,W")
    return dims  # type: ignore[return-value]


def _as_floats(value: Sequence[float] | str | None, name: str) -> tuple[float, ...] | None:
    if value is None:
        return None
    if isinstance(value, str):
        return parse_floats(value, name=name)
    return tuple(float(v) for v in value)


def _resolve_stats(
    mean: Sequence[float] | str | None,
    std: Sequence[float] | str | None,
    channels: int,
    default: tuple[Sequence[float], Sequence[float]],
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Mean/std for `channels` channels: None → the source's default; one value → every channel."""
    out: list[tuple[float, ...]] = []
    for name, given, fallback in (("mean", mean, default[0]), ("std", std, default[1])):
        values = _as_floats(given, name)
        if values is None:
            values = tuple(float(v) for v in fallback)
        if len(values) == 1 and channels > 1:
            values = values * channels
        if len(values) != channels:
            raise UserError(
                f"--{name} has {len(values)} value(s) but the data has {channels} channel(s); "
                f"give {channels} value(s), or one value for all channels"
            )
        out.append(values)
    if not all(math.isfinite(v) and v > 0 for v in out[1]):
        raise UserError(f"--std values must be positive, got {','.join(str(v) for v in out[1])}")
    return out[0], out[1]


# --------------------------------------------------------------------------- base dataset


class ChanpruneDataset(Dataset[tuple[Tensor, int]]):
    """Common attributes of every data set `open_dataset` returns."""

    kind: str = "data"

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

    def _pad_crop(self, x: Tensor, pad: int) -> Tensor:
        h, w = x.shape[-2:]
        padded = F.pad(x, (pad, pad, pad, pad))
        top, left = self._randint(2 * pad + 1), self._randint(2 * pad + 1)
        return padded[..., top : top + h, left : left + w]

    def _flip(self, x: Tensor) -> Tensor:
        return x.flip(-1) if self._uniform(0.0, 1.0) < 0.5 else x

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


def _pad_for(h: int, w: int) -> int:
    # 4 px is the CIFAR recipe at 32 px; tiny inputs (8×8 digits) get a proportionally smaller shift.
    side = min(h, w)
    return 4 if side >= 32 else max(1, side // 8)


# --------------------------------------------------------------------------- image folders


def _is_hidden(name: str) -> bool:
    return name.startswith(".") or name == "__MACOSX"


def _is_image_name(name: str) -> bool:
    return not _is_hidden(name) and os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def _visible_subdirs(path: Path) -> list[Path]:
    with os.scandir(path) as it:
        return sorted(
            (Path(e.path) for e in it if not _is_hidden(e.name) and e.is_dir()), key=lambda p: p.name
        )


def _has_images_at_depth2(root: Path) -> bool:
    for sub in _visible_subdirs(root):
        with os.scandir(sub) as it:
            if any(_is_image_name(e.name) and e.is_file() for e in it):
                return True
    return False


def _resolve_image_root(path: Path) -> Path:
    """`path` itself when it holds `<class>/<image>`; else its single split folder if that does."""
    if _has_images_at_depth2(path):
        return path
    subdirs = _visible_subdirs(path)
    if len(subdirs) == 1 and _has_images_at_depth2(subdirs[0]):
        return subdirs[0]
    return path


def _list_images(class_dir: Path) -> list[str]:
    found: list[str] = []
    for dirpath, dirnames, filenames in os.walk(class_dir, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not _is_hidden(d))
        found.extend(os.path.join(dirpath, f) for f in sorted(filenames) if _is_image_name(f))
    return found


def _probe_image(path: str) -> tuple[int, int] | None:
    """(width, height) if PIL can parse the file's header, else None (cheap: no pixel decode)."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            size = im.size
            im.verify()
        return size
    except Exception:  # PIL raises many types (UnidentifiedImageError, OSError, SyntaxError, ...)
        return None


_COLOR_MODES = frozenset({"RGB", "RGBA", "RGBX", "CMYK", "YCbCr", "LAB", "HSV"})


def _image_mode(path: str) -> str | None:
    """PIL mode of an image from its header (e.g. "L", "RGB"), or None when unreadable."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            return str(im.mode)
    except Exception:
        return None


class ImageFolderDataset(ChanpruneDataset):
    """`root/<class>/<image>` with lazy decoding; unreadable files are skipped at index time."""

    kind = "imagefolder"

    def __init__(
        self,
        path: Path,
        *,
        display: str,
        input_shape: tuple[int, int, int] | None,
        mean: Sequence[float] | str | None,
        std: Sequence[float] | str | None,
        train: bool,
    ) -> None:
        super().__init__(display)
        if input_shape is not None and input_shape[0] not in (1, 3):
            raise UserError(f"images can be loaded with 1 or 3 channels, not {input_shape[0]}")
        self.root = _resolve_image_root(path)
        class_dirs = _visible_subdirs(self.root)
        if not class_dirs:
            with os.scandir(self.root) as it:
                flat = any(_is_image_name(e.name) for e in it)
            if flat:
                raise UserError(
                    f"{display} holds images but no class folders; put them in {display}/<class>/ "
                    "(one folder named anything will do for unlabelled calibration data)"
                )
            raise UserError(f"no images found in {display} (expected {display}/<class>/<image>)")
        self.classes = [d.name for d in class_dirs]
        candidates: list[tuple[str, int]] = [
            (f, label) for label, d in enumerate(class_dirs) for f in _list_images(d)
        ]
        if not candidates:
            exts = "/".join(sorted(e.lstrip(".") for e in IMAGE_EXTENSIONS))
            raise UserError(f"no images found in {display} (looked for {exts} files in its class folders)")
        self.paths: list[str] = []
        sizes: set[tuple[int, int]] = set()
        for f, label in candidates:
            size = _probe_image(f)
            if size is None:
                self.skipped_files.append(f)
                continue
            sizes.add(size)
            self.paths.append(f)
            self.targets.append(label)
        self.skipped = len(self.skipped_files)
        if not self.paths:
            raise UserError(
                f"no readable images in {display} ({self.skipped} files could not be decoded), e.g. {self.skipped_files[0]}; "
                "check that they are complete image files"
            )
        if self.skipped:
            warnings.warn(
                DataWarning(
                    f"skipped {self.skipped} unreadable image file(s) in {display}, "
                    f"e.g. {self.skipped_files[0]}"
                ),
                stacklevel=3,
            )
        if input_shape is None:
            if len(sizes) > 1:
                a, b = sorted(sizes)[:2]
                raise UserError(
                    f"images in {display} have different sizes (e.g. {a[0]}x{a[1]} and {b[0]}x{b[1]}); "
                    "pass --input-shape C,H,W to resize them"
                )
            w, h = next(iter(sizes))
            input_shape = (3, h, w)
        self.input_shape = input_shape
        self.train = train
        self._mode = "L" if input_shape[0] == 1 else "RGB"
        first_mode = _image_mode(self.paths[0])
        if self._mode == "L" and first_mode in _COLOR_MODES:
            warnings.warn(
                DataWarning(
                    f"images in {display} are color ({first_mode}) but the model takes 1 channel; "
                    "converting them to grayscale (check --data if the model expects color images)"
                ),
                stacklevel=3,
            )
        default = (GRAY_MEAN, GRAY_STD) if input_shape[0] == 1 else (IMAGENET_MEAN, IMAGENET_STD)
        self._set_stats(*_resolve_stats(mean, std, input_shape[0], default))
        self._small = max(input_shape[1:]) <= SMALL_IMAGE_MAX

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        from PIL import Image

        _, h, w = self.input_shape
        path = self.paths[index]
        try:
            with Image.open(path) as im:
                if self.train and not self._small:
                    im = im.convert(self._mode) if im.mode != self._mode else im
                    left, top, cw, ch = self._rrc_box(im.width, im.height)
                    im = im.resize((w, h), Image.BILINEAR, box=(left, top, left + cw, top + ch))
                else:
                    if im.format == "JPEG" and im.width >= 2 * w and im.height >= 2 * h:
                        im.draft(self._mode, (w, h))  # DCT-domain downscale: much faster decode
                    if im.mode != self._mode:  # convert() copies even when the mode already fits
                        im = im.convert(self._mode)
                    if im.size != (w, h):
                        im = im.resize((w, h), Image.BILINEAR)
                array = np.array(im, dtype=np.uint8)
        except Exception as exc:  # the header was fine at index time; the pixel data is not
            raise UserError(f"could not decode image {path}: {exc}") from None
        x = torch.from_numpy(array)
        x = x.unsqueeze(0) if x.ndim == 2 else x.permute(2, 0, 1)
        if self.train:  # on uint8: zero padding is black either way, and it is cheaper
            if self._small:
                x = self._pad_crop(x, _pad_for(h, w))
            x = self._flip(x)
        # (x/255 - mean)/std folded into one subtraction and one division.
        return x.float().sub_(self._mean255).div_(self._std255), self.targets[index]

    def _set_stats(self, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        super()._set_stats(mean, std)
        self._mean255 = self._mean_t * 255.0
        self._std255 = self._std_t * 255.0


# --------------------------------------------------------------------------- in-memory images


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
        self._set_stats(*_resolve_stats(mean, std, input_shape[0], default_stats))

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
                x = self._pad_crop(x, _pad_for(h, w))
            if self._flip_ok:
                x = self._flip(x)
        if c == 3:
            x = x.expand(3, h, w)
        return self._normalize(x), self.targets[index]


# --------------------------------------------------------------------------- MNIST IDX

_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
_IDX_RE = re.compile(r"^(train|t10k)-(images|labels)[-.]idx([13])-ubyte(\.gz)?$", re.IGNORECASE)


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


def _find_idx(directory: Path) -> dict[str, dict[str, Path]]:
    """split ("train"/"t10k") → {"images": path, "labels": path} for IDX files in `directory`."""
    found: dict[str, dict[str, Path]] = {}
    folders = [directory, directory / "raw", directory / "MNIST" / "raw"]
    subdirs = _visible_subdirs(directory)
    if len(subdirs) == 1:  # e.g. an archive holding a single `mnist/` folder
        folders += [subdirs[0], subdirs[0] / "raw"]
    for folder in folders:
        if not folder.is_dir():
            continue
        for entry in sorted(folder.iterdir()):
            m = _IDX_RE.match(entry.name)
            if m and entry.is_file():
                found.setdefault(m.group(1).lower(), {}).setdefault(m.group(2).lower(), entry)
        if found:
            break
    return found


def _labels_for(images: Path) -> Path:
    name = re.sub(r"images([-.])idx3", r"labels\1idx1", images.name, flags=re.IGNORECASE)
    for candidate in (name, name[:-3] if name.lower().endswith(".gz") else name + ".gz"):
        if (images.parent / candidate).is_file():
            return images.parent / candidate
    raise UserError(f"found MNIST images {images} but not the labels file {images.parent / name}")


def _open_idx(images_path: Path, labels_path: Path, display: str, **kw: Any) -> TensorImageDataset:
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


# --------------------------------------------------------------------------- sklearn digits


@functools.lru_cache(maxsize=1)
def _digits_arrays() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(images in [0,1], labels, train indices, test indices): stratified 80/20, fixed seed."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise UserError("the digits data set needs scikit-learn: pip install scikit-learn") from None
    bunch = load_digits()
    images = np.asarray(bunch.images, dtype=np.float32) / 16.0
    labels = np.asarray(bunch.target, dtype=np.int64)
    rng = np.random.default_rng(DIGITS_SPLIT_SEED)
    train_idx: list[int] = []
    test_idx: list[int] = []
    for c in np.unique(labels):  # stratified so both splits keep the class balance
        idx = np.flatnonzero(labels == c)
        idx = idx[rng.permutation(len(idx))]
        n_test = int(round(len(idx) * DIGITS_TEST_FRACTION))
        test_idx.extend(idx[:n_test].tolist())
        train_idx.extend(idx[n_test:].tolist())
    return images, labels, np.array(sorted(train_idx)), np.array(sorted(test_idx))


def digits_stats() -> tuple[tuple[float], tuple[float]]:
    """Pixel mean/std of the digits training split: the default normalisation for `digits`."""
    images, _, train_idx, _ = _digits_arrays()
    sub = images[train_idx]
    return (float(sub.mean()),), (float(sub.std()),)


def _open_digits(spec: str, train: bool, **kw: Any) -> TensorImageDataset:
    parts = spec.split(":")
    split = parts[1].strip().lower() if len(parts) > 1 else ("train" if train else "test")
    if len(parts) > 2 or split not in ("train", "test", "all"):
        raise UserError(f"data source {spec!r}: use digits, digits:train, digits:test or digits:all")
    images, labels, train_idx, test_idx = _digits_arrays()
    idx = {"train": train_idx, "test": test_idx, "all": np.arange(len(labels))}[split]
    return TensorImageDataset(
        f"digits:{split}", "digits", torch.from_numpy(images[idx]), torch.from_numpy(labels[idx]),
        [str(i) for i in range(10)], scale=1.0, default_stats=digits_stats(), flip=False,
        train=train, **kw,
    )


# --------------------------------------------------------------------------- synthetic


class SyntheticDataset(ChanpruneDataset):
    """Seeded standard-normal inputs with uniform random labels; item i is the same on every run."""

    kind = "synthetic"

    def __init__(self, shape: tuple[int, int, int], num_classes: int, length: int, seed: int) -> None:
        super().__init__(f"synthetic:{'x'.join(map(str, shape))}:{num_classes}:{length}")
        self.input_shape = shape
        self.classes = [str(i) for i in range(num_classes)]
        self.seed = seed
        g = torch.Generator().manual_seed(seed)
        self.targets = torch.randint(0, num_classes, (length,), generator=g).tolist()
        # Already zero-mean unit-variance: no normalisation is applied.
        self._set_stats((0.0,) * shape[0], (1.0,) * shape[0])

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        if not 0 <= index < len(self.targets):
            raise IndexError(index)
        # One generator per item: random access (shuffling, workers) never changes item i.
        g = torch.Generator().manual_seed((self.seed << 32) + index + 1)
        return torch.randn(self.input_shape, generator=g), self.targets[index]


def _open_synthetic(spec: str, input_shape: tuple[int, int, int] | None) -> SyntheticDataset:
    usage = "use synthetic:CxHxW[:K[:N]], e.g. synthetic:3x32x32:10:256"
    fields = spec.split(":")[1:]
    if not fields or not fields[0].strip():
        if input_shape is None:
            raise UserError(f"data source {spec!r} needs a shape; {usage}")
        shape = input_shape
    else:
        try:
            shape = parse_shape(fields[0])
        except UserError:
            raise UserError(f"data source {spec!r}: bad shape {fields[0]!r}; {usage}") from None
    if input_shape is not None and tuple(input_shape) != shape:
        raise UserError(
            f"data source {spec!r} makes {'x'.join(map(str, shape))} inputs but the input shape is "
            f"{'x'.join(map(str, input_shape))}; use synthetic:{'x'.join(map(str, input_shape))} or fix --input-shape"
        )
    numbers: list[int] = []
    for f in fields[1:]:
        try:
            numbers.append(int(f))
        except ValueError:
            raise UserError(f"data source {spec!r}: {f!r} is not an integer; {usage}") from None
    if len(numbers) > 2 or any(n <= 0 for n in numbers):
        raise UserError(f"data source {spec!r}: {usage} (K classes and N samples must be positive)")
    classes = numbers[0] if numbers else SYNTHETIC_DEFAULT_CLASSES
    length = numbers[1] if len(numbers) > 1 else SYNTHETIC_DEFAULT_LENGTH
    return SyntheticDataset(shape, classes, length, SYNTHETIC_SEED)


# --------------------------------------------------------------------------- archives


def cache_root() -> Path:
    """`$XDG_CACHE_HOME/chanprune` (XDG: a relative value is ignored), else `~/.cache/chanprune`."""
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    if xdg and os.path.isabs(xdg):
        return Path(xdg) / "chanprune"
    try:
        return Path.home() / ".cache" / "chanprune"
    except RuntimeError:
        raise UserError("cannot find a home folder for the cache; set XDG_CACHE_HOME") from None


def _is_archive(path: Path) -> bool:
    return path.name.lower().endswith(ARCHIVE_SUFFIXES)


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _escapes(relative: str) -> bool:
    norm = posixpath.normpath(relative)
    return norm == ".." or norm.startswith("../") or norm.startswith("/")


def _member_problem(member: tarfile.TarInfo, filter_available: bool) -> str | None:
    """Why `member` must not be extracted, or None. The tarfile data filter re-checks on disk."""
    name = member.name
    if name.startswith("/") or re.match(r"^[A-Za-z]:", name):
        return "has an absolute path"
    if ".." in PurePosixPath(name).parts:
        return "climbs out of the archive ('..')"
    if member.ischr() or member.isblk() or member.isfifo():
        return "is a device or FIFO"
    if member.issym() or member.islnk():
        if not filter_available:
            return "is a link (links need Python's tarfile data filter, 3.11.4+)"
        target = member.linkname
        base = posixpath.dirname(name) if member.issym() else ""
        if target.startswith("/") or _escapes(posixpath.join(base, target)):
            return f"links outside the archive (to {target!r})"
        return None
    if not (member.isfile() or member.isdir()):
        return "is not a regular file, folder or link"
    return None


def _checked_members(tf: tarfile.TarFile, display: str, filter_available: bool) -> Iterator[tarfile.TarInfo]:
    for member in tf:
        problem = _member_problem(member, filter_available)
        if problem:
            raise UserError(f"refusing to extract {display}: member {member.name!r} {problem}; "
                            "use an archive whose members stay inside it (relative paths, no outside links)")
        yield member


def _remove_stale_tmp(folder: Path) -> None:
    """Best effort: drop temp folders left by extractions killed long ago."""
    now = time.time()
    try:
        entries = list(folder.iterdir())
    except OSError:
        return
    for entry in entries:
        if entry.name.startswith(".") and ".tmp-" in entry.name:
            try:
                if now - entry.stat().st_mtime > _STALE_TMP_SECONDS:
                    shutil.rmtree(entry, ignore_errors=True)
            except OSError:
                pass


def _extract(archive: Path, final: Path, display: str, digest: str) -> None:
    """Extract into a temp folder beside `final`, then rename: `final` only ever appears complete."""
    parent = final.parent
    _remove_stale_tmp(parent)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=parent))
    os.chmod(tmp, 0o755)  # mkdtemp makes it private; the extracted data is not secret
    filter_available = hasattr(tarfile, "data_filter")
    try:
        try:
            # Stream mode: one sequential pass, no backward seeks in the compressed stream.
            with tarfile.open(archive, "r|*") as tf:
                members = _checked_members(tf, display, filter_available)
                if filter_available:
                    tf.extractall(tmp, members=members, filter="data")
                else:  # pragma: no cover - Python < 3.11.4: our own checks refuse every link
                    tf.extractall(tmp, members=members)
        except UserError:
            raise
        except _FilterError as exc:
            raise UserError(f"refusing to extract {display}: {exc}; use an archive whose members stay inside it") from None
        except (tarfile.TarError, EOFError, zlib.error, ValueError) as exc:
            raise UserError(f"cannot read archive {display}: {exc}; it is damaged or incomplete, fetch or re-create it") from None
        except OSError as exc:
            raise ChanpruneError(
                f"cannot extract {display} into {parent}: {exc}; set XDG_CACHE_HOME to a writable "
                "folder with enough space"
            ) from None
        (tmp / _CACHE_MARKER).write_text(
            json.dumps({"archive": str(archive), "sha256": digest, "extracted": time.time()}),
            encoding="utf-8",
        )
        if final.exists() and not (final / _CACHE_MARKER).is_file():
            shutil.rmtree(final, ignore_errors=True)  # damaged by hand: the marker is always renamed in
        try:
            os.rename(tmp, final)
        except OSError:
            if not (final / _CACHE_MARKER).is_file():  # not a lost race with a concurrent extraction
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def extract_archive_cached(archive: Path, display: str | None = None) -> Path:
    """Folder holding `archive`'s extracted content, extracting it on first use only.

    The folder is keyed by the archive's sha256; a small memo keyed by (path, size, mtime, inode)
    avoids even re-hashing the archive on later runs.
    """
    display = display or str(archive)
    root = cache_root() / "datasets"
    try:
        (root / "by-stat").mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"cannot create the data cache {root}: {exc}; set XDG_CACHE_HOME") from None
    st = archive.stat()
    key = hashlib.sha256(
        f"{archive.resolve()}\0{st.st_size}\0{st.st_mtime_ns}\0{st.st_ino}".encode()
    ).hexdigest()[:_HASH_PREFIX]
    memo = root / "by-stat" / key
    try:
        digest = memo.read_text(encoding="ascii").strip()
    except (OSError, UnicodeDecodeError):
        digest = ""
    if re.fullmatch(r"[0-9a-f]{64}", digest) and (root / digest[:_HASH_PREFIX] / _CACHE_MARKER).is_file():
        return root / digest[:_HASH_PREFIX]
    try:
        digest = _sha256_file(archive)
    except OSError as exc:
        raise UserError(f"cannot read {display}: {exc}") from None
    final = root / digest[:_HASH_PREFIX]
    if not (final / _CACHE_MARKER).is_file():
        _extract(archive, final, display, digest)
    try:
        fd, tmp = tempfile.mkstemp(prefix=".memo.", dir=memo.parent)
        with os.fdopen(fd, "w", encoding="ascii") as fh:
            fh.write(digest)
        os.replace(tmp, memo)
    except OSError:
        pass  # the memo only saves a re-hash next time
    return final


# --------------------------------------------------------------------------- entry points


def _open_directory(path: Path, display: str, **kw: Any) -> ChanpruneDataset:
    idx = _find_idx(path)
    if idx:
        train = kw["train"]
        order = ("train", "t10k") if train else ("t10k", "train")
        for split in order:
            files = idx.get(split, {})
            if "images" in files:
                labels = files.get("labels") or _labels_for(files["images"])
                return _open_idx(files["images"], labels, display, **kw)
        raise UserError(f"{display} has MNIST label files but no images file")
    try:
        empty = not any(True for _ in path.iterdir())
    except OSError as exc:
        raise UserError(f"cannot read {display}: {exc}") from None
    if empty:
        raise UserError(f"data folder {display} is empty (expected {display}/<class>/<image>)")
    return ImageFolderDataset(path, display=display, **kw)


def open_dataset(
    source: str | os.PathLike[str],
    *,
    input_shape: Sequence[int] | str | None = None,
    mean: Sequence[float] | str | None = None,
    std: Sequence[float] | str | None = None,
    train: bool = False,
) -> ChanpruneDataset:
    """Open a `--data` source (see the module docstring) as a data set of (C×H×W float, label).

    `mean`/`std` None means the source's own default (ImageNet for RGB images, MNIST statistics for
    IDX files, training-split statistics for digits, none for synthetic). `train=True` adds random
    crop + flip (pad-and-crop up to 64 px, RandomResizedCrop above), and for `digits` / MNIST
    folders holding both splits it selects the training split.
    """
    shape = _as_shape(input_shape)
    text = str(source).strip()
    if not text:
        raise UserError(f"empty --data; give {ACCEPTED_FORMS}")
    lower = text.lower()
    if lower == "synthetic" or lower.startswith("synthetic:"):
        return _open_synthetic(text, shape)
    if lower == "digits" or lower.startswith("digits:"):
        return _open_digits(lower, train, input_shape=shape, mean=mean, std=std)
    path = Path(text).expanduser()
    kw: dict[str, Any] = {"input_shape": shape, "mean": mean, "std": std, "train": train}
    if not path.exists():
        scheme = re.match(r"^([a-z][a-z0-9+.-]*):", lower)
        if scheme and len(scheme.group(1)) > 1:  # one letter would be a Windows drive
            raise UserError(f"unknown data source {scheme.group(1)!r}: in {text!r}; accepted: {ACCEPTED_FORMS}")
        raise UserError(f"data path {text} does not exist; check the path (accepted: {ACCEPTED_FORMS})")
    if path.is_dir():
        return _open_directory(path, text, **kw)
    if _is_archive(path):
        return _open_directory(extract_archive_cached(path, text), text, **kw)
    if _IDX_RE.match(path.name) and "images" in path.name.lower():
        return _open_idx(path, _labels_for(path), text, **kw)
    raise UserError(f"{text} is a file but not a .tar/.tar.gz/.tgz archive or MNIST images; accepted: {ACCEPTED_FORMS}")


def _worker_init(worker_id: int) -> None:
    """Seed each worker from the loader's generator (torch sets info.seed = base_seed + worker_id)."""
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
