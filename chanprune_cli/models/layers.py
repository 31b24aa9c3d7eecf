"""Small modules whose channel behaviour the graph engine knows exactly (see graph.py rules)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class OptionAShortcut(nn.Module):
    """The CIFAR ResNet "option A" shortcut: subsample spatially, zero-pad the channel axis.

    The pad widths are attributes (not constants baked into a lambda) so that pruning can shrink
    them when it removes zero-padded channels.
    """

    def __init__(self, pad_front: int, pad_back: int, stride: int = 2) -> None:
        super().__init__()
        self.pad_front = pad_front
        self.pad_back = pad_back
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.stride
        return F.pad(x[:, :, ::s, ::s], (0, 0, 0, 0, self.pad_front, self.pad_back))

    def extra_repr(self) -> str:
        return f"pad_front={self.pad_front}, pad_back={self.pad_back}, stride={self.stride}"
