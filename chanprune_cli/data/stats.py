"""Normalisation statistics and the text forms of shapes and numbers.

Owns the default mean/std of each source kind, parsing `--input-shape` (images C,H,W; 1-D signals
C,L or L) / `--mean` / `--std` text, and resolving the mean/std a data set uses for its channel count.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

from ..errors import UserError

__all__ = [
    "GRAY_MEAN",
    "GRAY_STD",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "MNIST_MEAN",
    "MNIST_STD",
    "SHAPE_FORMS",
    "as_shape",
    "parse_floats",
    "parse_shape",
    "resolve_stats",
]

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)
# Grayscale image folders default to the channel average of the ImageNet statistics.
GRAY_MEAN: tuple[float] = (0.449,)
GRAY_STD: tuple[float] = (0.226,)
MNIST_MEAN: tuple[float] = (0.1307,)
MNIST_STD: tuple[float] = (0.3081,)


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


SHAPE_FORMS = "C,H,W (images), C,L or L (1-D signals)"


def parse_shape(text: str) -> tuple[int, ...]:
    """Parse "3,32,32" (or "3x32x32"), "1,1024" or "1024" into a shape of positive ints: (C, H, W)
    for images, (C, L) or (L,) for 1-D signals (Conv1d models; (L,) for a model that takes N×L)."""
    parts = [p.strip() for p in re.split(r"[,xX×]", str(text).strip())]
    try:
        dims = tuple(int(p) for p in parts)
    except ValueError:
        dims = ()
    if not 1 <= len(dims) <= 3 or any(d <= 0 for d in dims):
        raise UserError(f"input shape {text!r}: expected {SHAPE_FORMS} as positive integers, e.g. 3,32,32 or 1,1024")
    return dims


def as_shape(value: Sequence[int] | str | None) -> tuple[int, ...] | None:
    """An input shape given as text or numbers, checked; None stays None."""
    if value is None:
        return None
    if isinstance(value, str):
        return parse_shape(value)
    return parse_shape(",".join(str(int(v)) for v in value))


def _as_floats(value: Sequence[float] | str | None, name: str) -> tuple[float, ...] | None:
    if value is None:
        return None
    if isinstance(value, str):
        return parse_floats(value, name=name)
    return tuple(float(v) for v in value)


def resolve_stats(
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
