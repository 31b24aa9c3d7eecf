"""Image folders: `root/<class>/<image>` read lazily with PIL.

Owns the folder layout rules (class folders, an optional single split folder, nested images,
hidden and non-image files skipped), the header probe that skips unreadable files at index time,
and decoding one image into a normalised C×H×W tensor (grayscale or RGB, resize, augmentation).

Class names and indices come from torchvision's `find_classes` and the extension test from its
`has_file_allowed_extension`, so labels match `torchvision.datasets.ImageFolder` on the same
folder; the hidden-name rule is applied on top. The file walk and decoding stay ours:
`make_dataset` sorts by whole path string (`cat/a-b/` before `cat/a/sub/`, where a depth-first
walk has it after), descends into hidden folders, and refuses empty class folders before
torchvision 0.18; `DatasetFolder`'s loader always decodes to RGB, without the JPEG draft downscale.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torchvision.datasets.folder import find_classes, has_file_allowed_extension

from ..errors import UserError
from .base import SMALL_IMAGE_MAX, ChanpruneDataset, DataWarning, TensorForm, crop_flip, gray_to_color, pad_for, resized
from .listing import is_hidden, visible_subdirs
from .stats import GRAY_MEAN, GRAY_STD, IMAGENET_MEAN, IMAGENET_STD, resolve_stats

__all__ = ["IMAGE_EXTENSIONS", "ImageFolderDataset"]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm", ".pbm")

_COLOR_MODES = frozenset({"RGB", "RGBA", "RGBX", "CMYK", "YCbCr", "LAB", "HSV"})
_GRAY_MODES = frozenset({"1", "L", "LA", "I", "I;16", "F"})


def _is_image_name(name: str) -> bool:
    return not is_hidden(name) and has_file_allowed_extension(name, IMAGE_EXTENSIONS)


def _has_images_at_depth2(root: Path) -> bool:
    for sub in visible_subdirs(root):
        with os.scandir(sub) as it:
            if any(_is_image_name(e.name) and e.is_file() for e in it):
                return True
    return False


def _resolve_image_root(path: Path) -> Path:
    """`path` itself when it holds `<class>/<image>`; else its single split folder if that does."""
    if _has_images_at_depth2(path):
        return path
    subdirs = visible_subdirs(path)
    if len(subdirs) == 1 and _has_images_at_depth2(subdirs[0]):
        return subdirs[0]
    return path


def _class_names(root: Path) -> list[str]:
    """torchvision's sorted class folders, less hidden ones (their index would shift every label)."""
    try:
        names, _ = find_classes(root)
    except FileNotFoundError:  # torchvision's "no class folder"; the caller says what to do
        return []
    return [n for n in names if not is_hidden(n)]


def _list_images(class_dir: Path) -> list[str]:
    """Image files under `class_dir`, depth first: a folder's files, then each subfolder by name."""
    found: list[str] = []
    for dirpath, dirnames, filenames in os.walk(class_dir, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not is_hidden(d))
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
    except Exception:  # noqa: BLE001  (PIL raises many types: UnidentifiedImageError, OSError, SyntaxError, ...)
        return None


def _image_mode(path: str) -> str | None:
    """PIL mode of an image from its header (e.g. "L", "RGB"), or None when unreadable."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            return str(im.mode)
    except Exception:  # noqa: BLE001  (PIL raises many types for a file it cannot read)
        return None


class ImageFolderDataset(ChanpruneDataset):
    """`root/<class>/<image>` with lazy decoding; unreadable files are skipped at index time."""

    kind = "imagefolder"
    labels_by_name = True

    def __init__(
        self,
        path: Path,
        *,
        display: str,
        input_shape: tuple[int, int, int] | None,
        mean: Sequence[float] | str | None,
        std: Sequence[float] | str | None,
        train: bool,
        unlabelled: bool = False,
    ) -> None:
        """`unlabelled`: a folder of images without class folders is read too, as images without
        labels (no classes, every target 0), instead of refused."""
        super().__init__(display)
        if input_shape is not None and input_shape[0] not in (1, 3):
            raise UserError(f"images can be loaded with 1 or 3 channels, not {input_shape[0]}")
        self.root = _resolve_image_root(path)
        self.classes = _class_names(self.root)
        flat = False
        if not self.classes:
            with os.scandir(self.root) as it:
                flat = any(_is_image_name(e.name) for e in it)
            if flat and not unlabelled:
                raise UserError(
                    f"{display} holds images but no class folders; put them in {display}/<class>/ "
                    "(one folder named anything will do for unlabelled calibration data)"
                )
            if not flat:
                raise UserError(f"no images found in {display} (expected {display}/<class>/<image>)")
        candidates: list[tuple[str, int]] = [(f, 0) for f in _list_images(self.root)] if flat else [
            (f, label) for label, name in enumerate(self.classes) for f in _list_images(self.root / name)
        ]
        if not candidates:
            exts = "/".join(sorted(e.lstrip(".") for e in IMAGE_EXTENSIONS))
            raise UserError(f"no images found in {display} (looked for {exts} files in its class folders)")
        self.paths: list[str] = []
        self.sizes: list[tuple[int, int]] = []  # (width, height) of every image, from its header
        for f, label in candidates:
            size = _probe_image(f)
            if size is None:
                self.skipped_files.append(f)
                continue
            self.sizes.append(size)
            self.paths.append(f)
            self.targets.append(label)
        self.skipped = len(self.skipped_files)
        if not self.paths:
            raise UserError(
                f"no readable images in {display} ({self.skipped} files could not be decoded), e.g. {self.skipped_files[0]}; "
                "check that they are complete image files"
            )
        # stacklevel 3 (here and below): warnings point at open_dataset, which opened the folder.
        if self.skipped:
            warnings.warn(
                DataWarning(
                    f"skipped {self.skipped} unreadable image file(s) in {display}, "
                    f"e.g. {self.skipped_files[0]}"
                ),
                stacklevel=3,
            )
        model_shape = input_shape is not None  # else the data's own size, 3 channels: nothing is converted for a model
        if input_shape is None:
            sizes = set(self.sizes)
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
        if model_shape and self._mode == "RGB" and first_mode in _GRAY_MODES:
            warnings.warn(DataWarning(gray_to_color(display)), stacklevel=3)
        stored = {(h, w) for w, h in self.sizes}
        if len(stored) == 1 and any(s < t for s, t in zip(next(iter(stored)), input_shape[1:])):
            # photos of many sizes are resized as a matter of course; one size, enlarged, is most likely other data
            warnings.warn(DataWarning(resized(display, next(iter(stored)), input_shape[1:])), stacklevel=3)
        default = (GRAY_MEAN, GRAY_STD) if input_shape[0] == 1 else (IMAGENET_MEAN, IMAGENET_STD)
        self._set_stats(*resolve_stats(mean, std, input_shape[0], default))
        self._small = max(input_shape[1:]) <= SMALL_IMAGE_MAX

    def _decode(self, index: int, box: tuple[int, int, int, int] | None = None) -> Tensor:
        """Image `index` as uint8 C×H×W at the input size; `box` (left, top, width, height): the
        part of the image resized to it (a RandomResizedCrop), else the whole image."""
        from PIL import Image

        _, h, w = self.input_shape
        path = self.paths[index]
        try:
            with Image.open(path) as im:
                if box is not None:
                    im = im.convert(self._mode) if im.mode != self._mode else im
                    left, top, cw, ch = box
                    im = im.resize((w, h), Image.BILINEAR, box=(left, top, left + cw, top + ch))
                else:
                    if im.format == "JPEG" and im.width >= 2 * w and im.height >= 2 * h:
                        im.draft(self._mode, (w, h))  # DCT-domain downscale: much faster decode
                    if im.mode != self._mode:  # convert() copies even when the mode already fits
                        im = im.convert(self._mode)
                    if im.size != (w, h):
                        im = im.resize((w, h), Image.BILINEAR)
                array = np.array(im, dtype=np.uint8)
        except Exception as exc:  # noqa: BLE001  (the header was fine at index time; the pixel data is not)
            raise UserError(f"could not decode image {path}: {exc}") from None
        x = torch.from_numpy(array)
        return x.unsqueeze(0) if x.ndim == 2 else x.permute(2, 0, 1)

    def resized_crop_draws(self, index: int) -> tuple[tuple[int, int, int, int], bool]:
        """A large training image's RandomResizedCrop box (left, top, width, height) and flip, drawn
        from this data set's generator: what `__getitem__` applies, for the paths that decode
        elsewhere (`data.devicejpeg`)."""
        box = self._rrc_box(*self.sizes[index])
        return box, self._flip_draw()

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        if self.train and not self._small:
            box, flipped = self.resized_crop_draws(index)
            x = self._decode(index, box)
            x = x.flip(-1) if flipped else x
        else:
            x = self._decode(index)
            if self.train:  # on uint8: zero padding is black either way, and it is cheaper
                pad = pad_for(*self.input_shape[1:])
                x = crop_flip(x, pad, *self.crop_flip_draws(pad, True))
        # (x/255 - mean)/std folded into one subtraction and one division.
        return x.float().sub_(self._mean255).div_(self._std255), self.targets[index]

    def tensor_form(self) -> TensorForm | None:
        if not self._small:
            return None
        return TensorForm(augment=self.train, pad=pad_for(*self.input_shape[1:]), flip=True,
                          offset=self._mean255.flatten(), divisor=self._std255.flatten())

    def raw_item(self, index: int) -> Tensor:
        return self._decode(index)

    def cache_key(self) -> str | None:
        from .tensorcache import files_key

        return files_key(self.paths, self.input_shape, self._mode)

    def _set_stats(self, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        super()._set_stats(mean, std)
        self._mean255 = self._mean_t * 255.0
        self._std255 = self._std_t * 255.0
