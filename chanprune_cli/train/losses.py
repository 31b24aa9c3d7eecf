"""The task loss of labelled training (`--loss`): what the model's outputs are compared with the labels by.

* `ce`: cross-entropy, one class per sample (softmax over the outputs; outputs that are already
  probabilities, in [0, 1] and summing to 1, are taken as such);
* `bce`: binary cross-entropy of every output against the one-hot label, each output its own yes/no
  (multi-label heads, sigmoid outputs such as torchcrepe's pitch bins; raw outputs are passed
  through a sigmoid);
* `mse`: mean squared error of the outputs against the one-hot label.

`auto` picks from the outputs themselves (`choose_loss`): outputs in [0, 1] that do not sum to 1
come from a sigmoid, where cross-entropy over them cannot learn (their softmax is nearly uniform:
the loss stays at ln C), so they get `bce`; everything else gets `ce`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..errors import UserError

__all__ = ["LOSSES", "TaskLoss", "choose_loss"]

LOSSES = ("auto", "ce", "bce", "mse")
_EPS = 1e-7  # probabilities kept off 0 and 1, where their logarithm is infinite


@dataclass(frozen=True)
class TaskLoss:
    """One resolved loss: its `name` (ce | bce | mse), whether the outputs are `probabilities`
    (sigmoid or softmax outputs, not logits) and, for the report, `why` it was chosen."""

    name: str = "ce"
    probabilities: bool = False
    why: str = "the default"

    def __call__(self, outputs: torch.Tensor, labels: torch.Tensor, *, label_smoothing: float = 0.0,
                 reduction: str = "mean") -> torch.Tensor:
        if self.name == "ce":
            if self.probabilities:
                return F.nll_loss(outputs.clamp(_EPS, 1.0).log(), labels, reduction=reduction)
            return F.cross_entropy(outputs, labels, label_smoothing=label_smoothing, reduction=reduction)
        target = F.one_hot(labels, outputs.shape[-1]).to(outputs.dtype)
        if label_smoothing:
            target = target * (1 - label_smoothing) + label_smoothing / outputs.shape[-1]
        if self.name == "bce":
            per_output = (F.binary_cross_entropy(outputs.clamp(_EPS, 1 - _EPS), target, reduction="none")
                          if self.probabilities else
                          F.binary_cross_entropy_with_logits(outputs, target, reduction="none"))
        else:
            per_output = F.mse_loss(outputs, target, reduction="none")
        per_sample = per_output.mean(-1)  # per sample: comparable across output counts
        return per_sample.sum() if reduction == "sum" else per_sample.mean()

    def to_json(self) -> dict[str, object]:
        return {"name": self.name, "probabilities": self.probabilities, "why": self.why}


def choose_loss(requested: str, outputs: torch.Tensor) -> TaskLoss:
    """The loss for `requested` (`LOSSES`), given a batch of the model's outputs (N × classes)."""
    if requested not in LOSSES:
        raise UserError(f"--loss must be one of {', '.join(LOSSES)}, got {requested!r}")
    outputs = outputs.detach().float()
    in_unit = bool(outputs.numel()) and float(outputs.min()) >= 0.0 and float(outputs.max()) <= 1.0
    sums_to_one = in_unit and bool(torch.allclose(outputs.sum(-1), torch.ones(outputs.shape[0]), atol=1e-3))
    sigmoid = in_unit and not sums_to_one
    if requested != "auto":  # probabilities: what each loss reads as such (a softmax's for ce, a sigmoid's for bce)
        probabilities = sums_to_one if requested == "ce" else in_unit and requested == "bce"
        return TaskLoss(requested, probabilities=probabilities, why="--loss")
    if sigmoid:
        return TaskLoss("bce", probabilities=True,
                        why="the outputs lie in [0, 1] without summing to 1 (a sigmoid: each output its own yes/no)")
    if sums_to_one:
        return TaskLoss("ce", probabilities=True, why="the outputs are probabilities summing to 1 (a softmax)")
    return TaskLoss("ce", why="the outputs are logits")
