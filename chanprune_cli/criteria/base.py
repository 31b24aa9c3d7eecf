"""The criterion interface and registry (DESIGN §4).

A criterion turns a model and its channel graph (plus calibration data when it needs any) into one
score vector per channel group: higher means more important, so the lowest are removed first.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable
from typing import Any, ClassVar

import torch
from torch import nn

from ..errors import UserError
from ..graph import ChannelGraph, ChannelGroup, Slot

Batch = tuple[torch.Tensor, torch.Tensor]
Scores = dict[int, torch.Tensor]  # group id -> one score per class (channel) of the group


class WeightedScores(dict):  # type: ignore[type-arg]
    """Scores plus a per-group weight that a global allocation multiplies onto normalised scores
    (layer sensitivity: groups with larger weight keep more channels)."""

    group_weights: dict[int, float]


def group_weights(scores: Scores) -> dict[int, float]:
    return dict(getattr(scores, "group_weights", {}) or {})

NEEDS_WEIGHTS, NEEDS_DATA, NEEDS_LABELS = "weights", "data", "labels"


class Criterion(ABC):
    """One way of scoring channels. Subclasses set the class attributes and implement `score`."""

    name: ClassVar[str]
    summary: ClassVar[str]
    needs: ClassVar[str] = NEEDS_WEIGHTS  # weights | data (unlabelled) | labels

    @abstractmethod
    def score(self, model: nn.Module, graph: ChannelGraph, data: Iterable[Batch] | None,
              device: torch.device, *, seed: int = 0, **options: Any) -> Scores:
        """Scores for every prunable group of `graph` (pinned classes may get any value)."""


_REGISTRY: dict[str, type[Criterion]] = {}


def register(cls: type[Criterion]) -> type[Criterion]:
    _REGISTRY[cls.name] = cls
    return cls


def available() -> dict[str, type[Criterion]]:
    from . import _load_all  # noqa: F401  (importing registers every criterion)

    return dict(sorted(_REGISTRY.items()))


def get_criterion(name: str) -> Criterion:
    registry = available()
    if name not in registry:
        raise UserError(f"unknown criterion {name!r}; choose one of: {', '.join(registry)}")
    return registry[name]()


def check_requirements(criterion: Criterion, has_data: bool) -> None:
    """A criterion that needs data fails early, naming itself and the fix."""
    if criterion.needs != NEEDS_WEIGHTS and not has_data:
        kind = "labelled calibration data" if criterion.needs == NEEDS_LABELS else "calibration data"
        raise UserError(f"criterion {criterion.name!r} needs {kind}; pass --data (e.g. an ImageFolder, a .tar.gz of one, or synthetic:3x32x32)")


def producer_rows(model: nn.Module, slots: list[Slot]) -> list[tuple[str, torch.Tensor]]:
    """The weight rows (flattened filters) that produce one channel class, per producer module.

    A conv with groups produces local channel k in every group; a depthwise conv's channel j
    covers its `multiplier` output rows.
    """
    modules = dict(model.named_modules())
    rows: list[tuple[str, torch.Tensor]] = []
    for name, kind, index in slots:
        m = modules[name]
        weight = getattr(m, "weight", None)
        if weight is None:
            continue
        w = weight.detach()
        if kind == "out" and isinstance(m, (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)):
            rows.append((name, w[:, index].reshape(-1)))
        elif kind == "out" and isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            opg = m.out_channels // m.groups
            rows.append((name, w[[g * opg + index for g in range(m.groups)]].reshape(-1)))
        elif kind == "out":  # Linear
            rows.append((name, w[index].reshape(-1)))
        elif kind == "dw":
            mult = m.out_channels // m.in_channels
            rows.append((name, w[index * mult:(index + 1) * mult].reshape(-1)))
    return rows


def per_class(group: ChannelGroup, fn: Any) -> torch.Tensor:
    """Apply `fn(slots) -> float` to every class of a group."""
    return torch.tensor([float(fn(slots)) for slots in group.classes], dtype=torch.float64)
