"""1-D signals held in memory (audio frames, sensor series) for models that take N×L or N×C×L
inputs (Conv1d networks), from NumPy arrays (`arrays.py`).

Owns what images get and signals must not: nothing. Values are used as stored (no 0-255 scaling,
no resizing, no channel conversion, no augmentation: a crop or flip of an audio frame is another
pitch or another sound), and the normalisation is none unless `--mean`/`--std` are given.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ..errors import UserError
from .base import ChanpruneDataset
from .stats import resolve_stats

__all__ = ["SIGNAL_MEAN", "SIGNAL_STD", "SignalDataset"]

SIGNAL_MEAN: tuple[float] = (0.0,)  # signals are used as given: no normalisation by default
SIGNAL_STD: tuple[float] = (1.0,)


def _text(shape: Sequence[int]) -> str:
    return ",".join(str(d) for d in shape)


class SignalDataset(ChanpruneDataset):
    """Signals as an N×L or N×C×L tensor; items of the model's input shape, (L,) or (C, L)."""

    kind = "signals"

    def __init__(self, display: str, signals: Tensor, labels: Tensor, classes: list[str], *,
                 input_shape: tuple[int, ...] | None, mean: Sequence[float] | str | None,
                 std: Sequence[float] | str | None, train: bool) -> None:
        super().__init__(display)
        stored = tuple(int(d) for d in signals.shape[1:])
        shape = stored if input_shape is None else tuple(input_shape)
        if len(shape) not in (1, 2):
            raise UserError(f"{display} holds 1-D signals of shape {_text(stored)} (L or C,L) but the model takes "
                            f"{_text(shape)}; check --data or --input-shape")
        if _squeezed(stored) != _squeezed(shape):  # N×L fits (L,) and (1, L), and N×1×L too
            raise UserError(f"{display} holds signals of shape {_text(stored)} but the model takes {_text(shape)}; "
                            "signals are used as given (never resized): check --data, or pass --input-shape "
                            f"{_text(stored)}")
        self.signals = signals
        self.targets = [int(v) for v in labels.tolist()]
        self.classes = classes
        self.input_shape = shape  # type: ignore[assignment]
        self.train = train  # signals are never augmented
        channels = shape[0] if len(shape) == 2 else 1
        self._set_stats(*resolve_stats(mean, std, channels, (SIGNAL_MEAN, SIGNAL_STD)))

    def _set_stats(self, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        self.mean, self.std = mean, std
        view = (-1, 1) if len(self.input_shape) == 2 else (-1,)
        self._mean_t = torch.tensor(mean, dtype=torch.float32).view(*view)
        self._std_t = torch.tensor(std, dtype=torch.float32).view(*view)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        x = self.signals[index].to(torch.float32).reshape(self.input_shape)
        return self._normalize(x), self.targets[index]


def _squeezed(shape: Sequence[int]) -> tuple[int, ...]:
    """The shape without a leading single channel: (1, L) and (L,) hold the same values."""
    return tuple(shape[1:]) if len(shape) == 2 and shape[0] == 1 else tuple(shape)
