"""What the built-in architectures share: kwarg validation and the reference weight init."""

from __future__ import annotations

import math
from typing import Any

from torch import nn

from ..errors import UserError

__all__ = ["check_kwargs", "positive_int", "positive_width", "kaiming_init"]


def check_kwargs(arch: str, kwargs: dict[str, Any], allowed: tuple[str, ...]) -> None:
    unknown = sorted(set(kwargs) - set(allowed))
    if unknown:
        raise UserError(f"{arch} does not take kwarg(s) {', '.join(unknown)}; it accepts: {', '.join(allowed)}")


def positive_int(arch: str, key: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise UserError(f"{arch}: kwarg {key} must be a positive integer, got {value!r}")
    return value


def positive_width(arch: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise UserError(f"{arch}: kwarg width must be a positive number, got {value!r}")
    return value


def kaiming_init(module: nn.Module) -> None:
    # Same init as the reference implementation: Kaiming-normal (fan_in) on conv and linear weights.
    if isinstance(module, (nn.Conv2d, nn.Linear)):
        nn.init.kaiming_normal_(module.weight)
