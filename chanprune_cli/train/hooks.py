"""The `Hook` interface through which training-time pruning schedules (`schedules/`) plug into the
loop: gate channels around the forward, add loss terms and parameter groups, read gradients after
the backward, zero or physically remove channels after a step, and save / restore their state."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from .trainer import Trainer


class Hook:
    """A training-time schedule plugged into `Trainer` (all methods optional).

    Call order per step: `before_forward` → forward → `extra_loss` → backward → `after_backward`
    → optimizer step → `on_step_end` (trainer.step already counts this step) → `on_epoch_end` at
    epoch boundaries. `on_train_start` runs once per process start (fresh or resumed; a resumed
    run first gets `load_state_dict`), `on_train_end` after the last step. `final_architecture`
    False keeps the trainer from recording "best" checkpoints while the width is still changing.
    """

    name = "hook"
    final_architecture = True

    def on_train_start(self, trainer: Trainer) -> None: ...
    def param_groups(self, trainer: Trainer) -> list[dict[str, Any]]: return []
    def before_forward(self, trainer: Trainer, x: torch.Tensor, y: torch.Tensor) -> None: ...
    def extra_loss(self, trainer: Trainer, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor | None: return None
    def after_backward(self, trainer: Trainer, logits: torch.Tensor, y: torch.Tensor) -> None: ...
    def on_step_end(self, trainer: Trainer) -> None: ...
    def on_epoch_end(self, trainer: Trainer, epoch: int) -> None: ...
    def on_train_end(self, trainer: Trainer) -> None: ...
    def state_dict(self) -> dict[str, Any]: return {}
    def load_state_dict(self, state: Mapping[str, Any]) -> None: ...
    def plans(self) -> list[dict[str, Any]]: return []        # plan records of removals done
    def summary(self) -> dict[str, Any]: return {}            # recorded in the history entry
