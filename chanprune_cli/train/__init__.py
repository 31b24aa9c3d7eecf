"""Fine-tuning (and training-time pruning) of a CNN: the loop behind `chanprune finetune`.

The package follows one run: `config` (TrainConfig), `sampling` (seeded batches and
augmentation), `optim` (losses, SGD groups, warm-up + cosine, momentum through surgery),
`precision` (AMP), `distill` (label-free distillation: the teacher's outputs, the teacher gap),
`hooks` (the interface of training-time schedules, `schedules/`),
`validation`, `outputs` (file names, checkpoint records), `state` (the resumable state file),
`process` (stop on SIGINT/SIGTERM, thread count), `trainer` (the loop) and `smoke` (a one-step
trainability check). This module re-exports the names used elsewhere.

The engine and `checkpoint` are imported inside the few functions of this package that use them,
not at the top: they import torchvision (seconds), and `chanprune run` imports this package for
`outputs` alone. The schedules (`schedules/`, imported only by the finetune recipe) import at the top.
"""

from __future__ import annotations

from .config import TrainConfig
from .distill import Distillation
from .hooks import Hook
from .optim import WarmupCosine, build_optimizer, kd_loss
from .outputs import CheckpointInfo, OutputPaths
from .process import threads
from .sampling import mix_seed
from .smoke import train_step_check
from .state import load_train_state, model_from_state
from .trainer import Trainer, TrainResult
from .validation import validate

__all__ = [
    "CheckpointInfo",
    "Distillation",
    "Hook",
    "OutputPaths",
    "TrainConfig",
    "TrainResult",
    "Trainer",
    "WarmupCosine",
    "build_optimizer",
    "kd_loss",
    "load_train_state",
    "mix_seed",
    "model_from_state",
    "threads",
    "train_step_check",
    "validate",
]
