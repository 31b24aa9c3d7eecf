"""Datasets and loaders for calibration, evaluation and fine-tuning.

Every data set yields `(float tensor C×H×W, int label)` and carries `classes`, `num_classes`,
`targets`, `input_shape`, `mean`, `std`, `skipped` and `skipped_files` attributes.

Modules, in the order data flows: `sources` (which reader opens a `--data` string; the accepted
forms), `archive` (tarballs extracted once into the cache), `imagefolder`, `idx` (MNIST),
`arrays` (NumPy .npz/.npy), `digits` and `synthetic` (the readers), `tensorimages` (in-memory
images for IDX, NumPy arrays and digits), `base` (the data set base class and augmentation), `listing` (the hidden-name rule),
`stats` (mean/std defaults, shape and number parsing), `loaders` (DataLoaders, label check),
`classes` (data classes matched to a model's outputs by name: `--classes`).
"""

from __future__ import annotations

from .archive import cache_root
from .base import DataWarning
from .classes import ClassesArg, fit_classes, parse_classes, recorded_classes, with_classes
from .loaders import check_labels, make_loader
from .sources import open_dataset
from .stats import IMAGENET_MEAN, IMAGENET_STD, parse_floats, parse_shape
from .synthetic import SYNTHETIC_DEFAULT_LENGTH

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "SYNTHETIC_DEFAULT_LENGTH",
    "ClassesArg",
    "DataWarning",
    "cache_root",
    "check_labels",
    "fit_classes",
    "make_loader",
    "open_dataset",
    "parse_classes",
    "parse_floats",
    "parse_shape",
    "recorded_classes",
    "with_classes",
]
