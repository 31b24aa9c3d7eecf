"""scikit-learn's bundled 8×8 digits as a data set, with a fixed stratified 80/20 split.

Owns the split (seeded, per class), the training-split statistics used as the default
normalisation, and the `digits[:train|:test|:all]` source spelling.
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np
import torch

from ..errors import UserError
from .tensorimages import TensorImageDataset

__all__ = ["DIGITS_SPLIT_SEED", "DIGITS_TEST_FRACTION", "digits_stats", "open_digits"]

DIGITS_SPLIT_SEED = 0
DIGITS_TEST_FRACTION = 0.2


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


def open_digits(spec: str, train: bool, **kw: Any) -> TensorImageDataset:
    """`digits[:train|:test|:all]` (lower-cased); no split named → train or test per `train`."""
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
