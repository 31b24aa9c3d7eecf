"""Synthetic data: seeded standard-normal inputs with random labels (`synthetic:CxHxW[:K[:N]]`).

Owns the source spelling and its defaults, and making item i the same on every run and in any
access order.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..errors import UserError
from .base import ChanpruneDataset
from .stats import parse_shape

__all__ = [
    "SYNTHETIC_DEFAULT_CLASSES",
    "SYNTHETIC_DEFAULT_LENGTH",
    "SYNTHETIC_SEED",
    "SyntheticDataset",
    "is_synthetic",
    "open_synthetic",
]

SYNTHETIC_DEFAULT_CLASSES = 10
SYNTHETIC_DEFAULT_LENGTH = 256
SYNTHETIC_SEED = 0


class SyntheticDataset(ChanpruneDataset):
    """Seeded standard-normal inputs with uniform random labels; item i is the same on every run."""

    kind = "synthetic"

    def __init__(self, shape: tuple[int, ...], num_classes: int, length: int, seed: int) -> None:
        super().__init__(f"synthetic:{'x'.join(map(str, shape))}:{num_classes}:{length}")
        self.input_shape = shape
        self.classes = [str(i) for i in range(num_classes)]
        self.seed = seed
        g = torch.Generator().manual_seed(seed)
        self.targets = torch.randint(0, num_classes, (length,), generator=g).tolist()
        # Already zero-mean unit-variance: no normalisation is applied.
        channels = shape[0] if len(shape) > 1 else 1  # (L,): one channel
        self._set_stats((0.0,) * channels, (1.0,) * channels)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        if not 0 <= index < len(self.targets):
            raise IndexError(index)
        # One generator per item: random access (shuffling, workers) never changes item i.
        g = torch.Generator().manual_seed((self.seed << 32) + index + 1)
        return torch.randn(self.input_shape, generator=g), self.targets[index]


def is_synthetic(source: str) -> bool:
    """Whether a `--data` string names synthetic data."""
    text = source.strip().lower()
    return text == "synthetic" or text.startswith("synthetic:")


def open_synthetic(spec: str, input_shape: tuple[int, int, int] | None) -> SyntheticDataset:
    """Parse `synthetic:CxHxW[:K[:N]]`; a missing shape is taken from `input_shape`."""
    usage = "use synthetic:CxHxW[:K[:N]] (1-D inputs: CxL or L), e.g. synthetic:3x32x32:10:256"
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
