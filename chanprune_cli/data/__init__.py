"""Datasets and loaders for calibration, evaluation and fine-tuning.

Every data set yields `(float tensor C×H×W, int label)` and carries `classes`, `num_classes`,
`targets`, `input_shape`, `mean`, `std`, `skipped` and `skipped_files` attributes.

Modules, in the order data flows: `sources` (which reader opens a `--data` string; the accepted
forms), `archive` (tarballs extracted once into the cache), `imagefolder`, `idx` (MNIST),
`digits` and `synthetic` (the readers), `tensorimages` (in-memory grayscale images for IDX and
digits), `base` (the data set base class and augmentation), `listing` (the hidden-name rule),
`stats` (mean/std defaults, shape and number parsing), `loaders` (DataLoaders, label check).
"""

from __future__ import annotations

from .archive import cache_root
from .base import DataWarning
from .loaders import check_labels, make_loader
from .sources import open_dataset
from .stats import IMAGENET_MEAN, IMAGENET_STD, parse_floats, parse_shape
from .synthetic import SYNTHETIC_DEFAULT_LENGTH

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "SYNTHETIC_DEFAULT_LENGTH",
    "DataWarning",
    "cache_root",
    "check_labels",
    "make_loader",
    "open_dataset",
    "parse_floats",
    "parse_shape",
]
