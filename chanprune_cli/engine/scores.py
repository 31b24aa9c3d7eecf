"""Scores as the engine consumes them: one vector per channel group, optionally carrying
per-group weights (layer sensitivity) and per-channel factors (White-Box's rescale)."""

from __future__ import annotations

import torch

Scores = dict[int, torch.Tensor]  # group id -> one score per class (channel) of the group


class WeightedScores(dict):  # type: ignore[type-arg]
    """Scores plus a per-group weight that a global allocation multiplies onto normalised scores
    (layer sensitivity: groups with larger weight keep more channels)."""

    group_weights: dict[int, float]


def group_weights(scores: Scores) -> dict[int, float]:
    return dict(getattr(scores, "group_weights", {}) or {})


def channel_scales(scores: Scores) -> dict[int, torch.Tensor]:
    """Per-channel factors that pruning multiplies onto the surviving channels (White-Box's BN
    rescale by sum_k M[k, c] / 2); empty for criteria that carry none."""
    return dict(getattr(scores, "channel_scale", {}) or {})
