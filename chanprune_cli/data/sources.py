"""`--data` sources: which reader opens a given source string.

`--data` accepts:

* an ImageFolder directory (`root/<class>/<image>`), or a directory holding one split folder
  (`root/test/<class>/<image>`); where the caller takes images without labels (`unlabelled`,
  label-free distillation), also a folder of images without class folders;
* a `.tar` / `.tar.gz` / `.tgz` (also `.tar.bz2`, `.tar.xz`) of such a folder, extracted once into
  `$XDG_CACHE_HOME/chanprune/datasets/<content hash>/`;
* a directory of MNIST IDX files (`t10k-images-idx3-ubyte[.gz]` + labels, or `train-*`), or the
  images IDX file itself;
* a NumPy `.npz` of `images` and `labels` (optional `classes`), or a `.npy` of images alone
  (unlabelled); layouts in `arrays`;
* `synthetic:CxHxW[:K[:N]]` — N (default 256) seeded standard-normal inputs, K (default 10) classes;
* `digits[:train|:test|:all]` — scikit-learn's bundled 8×8 digits, split 80/20 with a fixed seed.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..errors import UserError
from .archive import extract_archive_cached, is_archive
from .arrays import is_array_file, open_arrays
from .base import ChanpruneDataset
from .digits import open_digits
from .idx import IDX_RE, find_idx, labels_for, open_idx
from .stats import as_shape
from .synthetic import is_synthetic, open_synthetic

__all__ = ["ACCEPTED_FORMS", "open_dataset"]

ACCEPTED_FORMS = (
    "an ImageFolder directory (root/<class>/<image>), a .tar/.tar.gz/.tgz of one, "
    "a directory of MNIST IDX files, a NumPy .npz of images and labels (or .npy of images), "
    "synthetic:CxHxW[:K[:N]], or digits[:train|:test|:all]"
)


def _open_directory(path: Path, display: str, unlabelled: bool, **kw: Any) -> ChanpruneDataset:
    idx = find_idx(path)
    if idx:
        train = kw["train"]
        order = ("train", "t10k") if train else ("t10k", "train")
        for split in order:
            files = idx.get(split, {})
            if "images" in files:
                labels = files.get("labels") or labels_for(files["images"])
                return open_idx(files["images"], labels, display, **kw)
        raise UserError(f"{display} has MNIST label files but no images file")
    try:
        empty = not any(True for _ in path.iterdir())
    except OSError as exc:
        raise UserError(f"cannot read {display}: {exc}") from None
    if empty:
        raise UserError(f"data folder {display} is empty (expected {display}/<class>/<image>)")
    # Imported here: it pulls in torchvision (about a second), which the other sources never need.
    from .imagefolder import ImageFolderDataset

    return ImageFolderDataset(path, display=display, unlabelled=unlabelled, **kw)


def open_dataset(
    source: str | os.PathLike[str],
    *,
    input_shape: Sequence[int] | str | None = None,
    mean: Sequence[float] | str | None = None,
    std: Sequence[float] | str | None = None,
    train: bool = False,
    unlabelled: bool = False,
) -> ChanpruneDataset:
    """Open a `--data` source (see the module docstring) as a data set of (C×H×W float, label).
    `unlabelled`: a folder (or archive) of images without class folders opens as images without
    labels (no classes, every target 0) instead of being refused.

    `mean`/`std` None means the source's own default (ImageNet for RGB images, MNIST statistics for
    IDX files, training-split statistics for digits, none for synthetic). `train=True` adds random
    crop + flip (pad-and-crop up to 64 px, RandomResizedCrop above), and for `digits` / MNIST
    folders holding both splits it selects the training split.
    """
    shape = as_shape(input_shape)
    text = str(source).strip()
    if not text:
        raise UserError(f"empty --data; give {ACCEPTED_FORMS}")
    lower = text.lower()
    if shape is not None and len(shape) < 3 and not (is_synthetic(text) or is_array_file(Path(text))):
        raise UserError(f"the model takes 1-D inputs ({','.join(map(str, shape))}) but --data {text} holds images; give "
                        "it 1-D signals as NumPy arrays (.npz/.npy, N×L or N×C×L)")
    if is_synthetic(text):
        return open_synthetic(text, shape)
    if lower == "digits" or lower.startswith("digits:"):
        return open_digits(lower, train, input_shape=shape, mean=mean, std=std)
    path = Path(text).expanduser()
    kw: dict[str, Any] = {"input_shape": shape, "mean": mean, "std": std, "train": train, "unlabelled": unlabelled}
    if not path.exists():
        scheme = re.match(r"^([a-z][a-z0-9+.-]*):", lower)
        if scheme and len(scheme.group(1)) > 1:  # one letter would be a Windows drive
            raise UserError(f"unknown data source {scheme.group(1)!r}: in {text!r}; accepted: {ACCEPTED_FORMS}")
        raise UserError(f"data path {text} does not exist; check the path (accepted: {ACCEPTED_FORMS})")
    if path.is_dir():
        return _open_directory(path, text, **kw)
    if is_archive(path):
        return _open_directory(extract_archive_cached(path, text), text, **kw)
    del kw["unlabelled"]  # only folders of images can be without labels here
    if is_array_file(path):
        return open_arrays(path, text, **kw)
    if IDX_RE.match(path.name) and "images" in path.name.lower():
        return open_idx(path, labels_for(path), text, **kw)
    raise UserError(f"{text} is a file but not a .tar/.tar.gz/.tgz archive, NumPy arrays or MNIST images; "
                    f"accepted: {ACCEPTED_FORMS}")
