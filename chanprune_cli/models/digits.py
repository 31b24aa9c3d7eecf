"""digits_cnn: a small CNN for 1×8×8 digits (exercises the flatten → Linear channel coupling)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .builtin_common import check_kwargs, kaiming_init, positive_int, positive_width

__all__ = ["DigitsCNN", "make_digits"]


class DigitsCNN(nn.Module):
    """conv16-conv32-maxpool-conv32 (BN+ReLU each), flatten, fc 64, fc num_classes."""

    def __init__(self, num_classes: int = 10, width: float = 1) -> None:
        super().__init__()
        c1, c2, f1 = (max(1, int(round(c * width))) for c in (16, 32, 64))
        self.conv1 = nn.Conv2d(1, c1, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c1)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(c1, c2, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c2)
        self.relu2 = nn.ReLU()
        self.pool = nn.MaxPool2d(2)
        self.conv3 = nn.Conv2d(c2, c2, 3, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(c2)
        self.relu3 = nn.ReLU()
        self.fc1 = nn.Linear(c2 * 4 * 4, f1)
        self.relu4 = nn.ReLU()
        self.fc2 = nn.Linear(f1, num_classes)
        self.apply(kaiming_init)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu1(self.bn1(self.conv1(x)))
        x = self.pool(self.relu2(self.bn2(self.conv2(x))))
        x = self.relu3(self.bn3(self.conv3(x)))
        x = torch.flatten(x, 1)
        return self.fc2(self.relu4(self.fc1(x)))


def make_digits(kwargs: dict[str, Any]) -> nn.Module:
    """The factory of built-in `digits_cnn` (kwargs: num_classes, width)."""
    check_kwargs("digits_cnn", kwargs, ("num_classes", "width"))
    num_classes = positive_int("digits_cnn", "num_classes", kwargs.get("num_classes", 10))
    width = positive_width("digits_cnn", kwargs.get("width", 1))
    return DigitsCNN(num_classes=num_classes, width=width)
