"""The training configuration: every knob of the loop, its validation, and which knobs change the
result (a resumed run must repeat those)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from ..errors import UserError
from .losses import LOSSES

# Config fields that change the result: a resumed run must use the same values.
RESULT_FIELDS = ("epochs", "max_steps", "batch_size", "lr", "momentum", "nesterov", "weight_decay",
                 "decay_norm_and_bias", "warmup", "min_lr", "label_smoothing", "kd_alpha",
                 "kd_temperature", "amp", "grad_clip", "seed", "augment", "loss")


@dataclass
class TrainConfig:
    """Every knob of the loop; the CLI maps its options 1:1 onto these fields."""

    epochs: int | None = None          # None: 1, or as many as --max-steps needs
    max_steps: int | None = None       # bound on optimizer steps (the schedule spans the bounded run)
    batch_size: int = 64               # global batch (split over torchrun processes)
    lr: float = 0.01
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-4
    decay_norm_and_bias: bool = False  # weight decay on norm parameters and biases too
    warmup: float = 0.05               # < 1: fraction of the steps; >= 1: a number of steps
    min_lr: float = 0.0                # the cosine ends here
    label_smoothing: float = 0.0
    kd_alpha: float = 0.5              # weight of the distillation term (with a teacher)
    kd_temperature: float = 4.0
    amp: str = "auto"                  # auto | off | bf16 | fp16 (CUDA only)
    channels_last: bool | None = None  # None: on CUDA
    grad_clip: float | None = None     # max global gradient norm
    seed: int = 0
    augment: bool = True               # random crop + flip (small images) / random-resized crop + flip
    loss: str = "auto"                 # auto | ce | bce | mse: the task loss on labels (train.losses)
    workers: int | None = None         # loader processes (None: inputs.default_workers for the device)
    tensor_cache: bool | None = None   # small images as one tensor on the device (None: when possible)
    device_decode: bool = False        # large JPEG images decoded on the device (data.devicejpeg)
    compile: bool = False              # torch.compile the forward passes
    eval_every: int | None = None      # steps between validations (None: every epoch)
    eval_batch_size: int | None = None
    val_images: int | None = None      # validate on a fixed random subset of this many images
    save_every: int | None = 200       # steps between saved states (also at every epoch end)
    log_every: int = 50                # steps between log lines when stderr is not a terminal
    progress: bool = True

    def check(self) -> None:
        """UserError naming the CLI option of the first invalid value."""
        if self.epochs is not None and self.epochs < 1:
            raise UserError(f"--epochs must be at least 1, got {self.epochs}")
        if self.max_steps is not None and self.max_steps < 1:
            raise UserError(f"--max-steps must be at least 1, got {self.max_steps}")
        if self.batch_size < 1:
            raise UserError(f"--batch-size must be at least 1, got {self.batch_size}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise UserError(f"--lr must be a positive number, got {self.lr}")
        if not 0 <= self.momentum < 1:
            raise UserError(f"--momentum must be in [0, 1), got {self.momentum}")
        if self.weight_decay < 0:
            raise UserError(f"--weight-decay must be 0 or more, got {self.weight_decay}")
        if self.warmup < 0:
            raise UserError(f"--warmup must be 0 or more (a fraction < 1 or a number of steps), got {self.warmup}")
        if self.warmup >= 1 and not float(self.warmup).is_integer():
            raise UserError(f"--warmup {self.warmup}: use a fraction below 1 or a whole number of steps")
        if not 0 <= self.min_lr <= self.lr:
            raise UserError(f"--min-lr must be between 0 and --lr ({self.lr}), got {self.min_lr}")
        if not 0 <= self.label_smoothing < 1:
            raise UserError(f"--label-smoothing must be in [0, 1), got {self.label_smoothing}")
        if not 0 <= self.kd_alpha <= 1:
            raise UserError(f"--kd-alpha must be in [0, 1], got {self.kd_alpha}")
        if not self.kd_temperature > 0:
            raise UserError(f"--kd-temperature must be positive, got {self.kd_temperature}")
        if self.loss not in LOSSES:
            raise UserError(f"--loss must be one of {', '.join(LOSSES)}, got {self.loss!r}")
        if self.amp not in ("auto", "off", "bf16", "fp16"):
            raise UserError(f"--amp must be auto, off, bf16 or fp16, got {self.amp!r}")
        if self.grad_clip is not None and not self.grad_clip > 0:
            raise UserError(f"--grad-clip must be positive, got {self.grad_clip}")
        for name in ("eval_every", "save_every", "eval_batch_size", "val_images"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise UserError(f"--{name.replace('_', '-')} must be at least 1, got {value}")
        if self.log_every < 1:
            raise UserError(f"--log-every must be at least 1, got {self.log_every}")
        if self.workers is not None and self.workers < 0:
            raise UserError(f"--workers must be 0 or more, got {self.workers}")

    def result_fields(self) -> dict[str, Any]:
        """The values of RESULT_FIELDS (recorded in the state; compared on resume)."""
        return {k: getattr(self, k) for k in RESULT_FIELDS}
