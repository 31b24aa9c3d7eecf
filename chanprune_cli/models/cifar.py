"""The CIFAR ResNets (He et al. 2016, option-A shortcuts), key names as in akamaster/pytorch_resnet_cifar10.

`OptionAShortcut` is a module of its own so the graph engine can know its channel behaviour exactly
(see engine/graph.py rules) and surgery can shrink its padding.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .builtin_common import check_kwargs, kaiming_init, positive_int, positive_width

__all__ = ["CIFAR_DEPTHS", "OptionAShortcut", "BasicBlock", "CifarResNet", "make_cifar"]

# Depth → blocks per stage (depth = 6n + 2).
CIFAR_DEPTHS = {20: 3, 32: 5, 44: 7, 56: 9, 110: 18}


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


class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN, plus a weightless shortcut, then ReLU."""

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut: nn.Module
        if stride != 1 or in_planes != planes:
            # Option A: subsample + zero-pad channels (planes//4 each side doubles 16→32, 32→64).
            # (planes - in_planes) // 2 == planes // 4 for the standard doubling; any width works.
            front = (planes - in_planes) // 2
            self.shortcut = OptionAShortcut(pad_front=front, pad_back=planes - in_planes - front, stride=stride)
        else:
            self.shortcut = nn.Identity()
        self.relu2 = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out = out + self.shortcut(x)
        return self.relu2(out)


class CifarResNet(nn.Module):
    """ResNet-(6n+2) for 32×32 inputs: 16/32/64-channel stages (× `width`), global average pool, `linear`."""

    def __init__(self, num_blocks: list[int], num_classes: int = 10, width: float = 1) -> None:
        super().__init__()
        base = max(1, int(round(16 * width)))
        self.in_planes = base
        self.conv1 = nn.Conv2d(3, base, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(base)
        self.relu = nn.ReLU()
        self.layer1 = self._make_layer(base, num_blocks[0], stride=1)
        self.layer2 = self._make_layer(2 * base, num_blocks[1], stride=2)
        self.layer3 = self._make_layer(4 * base, num_blocks[2], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.linear = nn.Linear(4 * base, num_classes)
        self.apply(kaiming_init)

    def _make_layer(self, planes: int, blocks: int, stride: int) -> nn.Sequential:
        layers: list[nn.Module] = []
        for s in [stride] + [1] * (blocks - 1):
            layers.append(BasicBlock(self.in_planes, planes, s))
            self.in_planes = planes
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        out = torch.flatten(self.avgpool(out), 1)
        return self.linear(out)


def make_cifar(depth: int) -> Callable[[dict[str, Any]], nn.Module]:
    """The factory of built-in `cifar_resnet{depth}` (kwargs: num_classes, width)."""

    def build(kwargs: dict[str, Any]) -> nn.Module:
        arch = f"cifar_resnet{depth}"
        check_kwargs(arch, kwargs, ("num_classes", "width"))
        num_classes = positive_int(arch, "num_classes", kwargs.get("num_classes", 10))
        width = positive_width(arch, kwargs.get("width", 1))
        n = CIFAR_DEPTHS[depth]
        return CifarResNet([n, n, n], num_classes=num_classes, width=width)

    return build
