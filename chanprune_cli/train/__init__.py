"""Fine-tuning (and training-time pruning) of a CNN: the loop behind `chanprune finetune`.

What one run does, in order:

* data: every global batch is a fixed slice of a seeded permutation of the training set for that
  epoch, and every sample's augmentation is seeded by (seed, epoch, index). The run is therefore
  a pure function of the seed: independent of worker processes, of where it was interrupted, and
  of the number of processes it is split over (each rank takes its share of each global batch);
* optimisation: SGD (momentum 0.9, nesterov) with weight decay on conv/linear weights only (not on
  norm parameters and biases), linear warm-up then cosine decay of the learning rate, optional
  label smoothing, optional knowledge distillation from a teacher (KL of temperature-softened
  logits, weighted with cross-entropy), optional gradient clipping;
* on CUDA: mixed precision (bf16, or fp16 with a gradient scaler) and channels-last memory;
* under torchrun: DistributedDataParallel (NCCL on GPUs, gloo on CPUs), validation sharded over
  ranks, only rank 0 prints and writes;
* hooks (`Hook`) plug training-time pruning schedules into the loop (schedules.py): they may gate
  channels around the forward, add loss terms and parameter groups, read gradients after the
  backward, zero or physically remove channels after a step (`Trainer.replace_model` rebuilds the
  optimizer, carrying momentum buffers through the same surgery);
* outputs (`OutputPaths`): `--out` gets the final model, `<out>.best` the best validated one,
  `<out>.last` + `<out>.state.pt` the resumable state (weights, optimizer, scheduler, scaler, RNG,
  step, hook state), written atomically every `save_every` steps, at epoch ends and on Ctrl-C /
  SIGTERM. `--resume` continues from it with the same result as an uninterrupted run.
"""

from __future__ import annotations

import copy
import math
import os
import random
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler

from ..support import distributed as D
from ..errors import ChanpruneError, UserError
from ..support.fsutil import atomic_path
from ..support.progress import progress_bar, stderr_is_terminal

__all__ = [
    "Hook",
    "OutputPaths",
    "TrainConfig",
    "TrainResult",
    "Trainer",
    "WarmupCosine",
    "build_optimizer",
    "kd_loss",
    "load_train_state",
    "model_from_state",
    "train_step_check",
    "validate",
]

STATE_FORMAT = "chanprune-train-state"
STATE_VERSION = 1
_MASK64 = (1 << 64) - 1

# Config fields that change the result: a resumed run must use the same values.
_RESULT_FIELDS = ("epochs", "max_steps", "batch_size", "lr", "momentum", "nesterov", "weight_decay",
                  "decay_norm_and_bias", "warmup", "min_lr", "label_smoothing", "kd_alpha",
                  "kd_temperature", "amp", "grad_clip", "seed", "augment")


# --------------------------------------------------------------------------------------------
# configuration


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
    workers: int = 0
    eval_every: int | None = None      # steps between validations (None: every epoch)
    eval_batch_size: int | None = None
    val_images: int | None = None      # validate on a fixed random subset of this many images
    save_every: int | None = 200       # steps between saved states (also at every epoch end)
    log_every: int = 50                # steps between log lines when stderr is not a terminal
    progress: bool = True

    def check(self) -> None:
        def bad(msg: str) -> UserError:
            return UserError(msg)

        if self.epochs is not None and self.epochs < 1:
            raise bad(f"--epochs must be at least 1, got {self.epochs}")
        if self.max_steps is not None and self.max_steps < 1:
            raise bad(f"--max-steps must be at least 1, got {self.max_steps}")
        if self.batch_size < 1:
            raise bad(f"--batch-size must be at least 1, got {self.batch_size}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise bad(f"--lr must be a positive number, got {self.lr}")
        if not 0 <= self.momentum < 1:
            raise bad(f"--momentum must be in [0, 1), got {self.momentum}")
        if self.weight_decay < 0:
            raise bad(f"--weight-decay must be 0 or more, got {self.weight_decay}")
        if self.warmup < 0:
            raise bad(f"--warmup must be 0 or more (a fraction < 1 or a number of steps), got {self.warmup}")
        if self.warmup >= 1 and not float(self.warmup).is_integer():
            raise bad(f"--warmup {self.warmup}: use a fraction below 1 or a whole number of steps")
        if not 0 <= self.min_lr <= self.lr:
            raise bad(f"--min-lr must be between 0 and --lr ({self.lr}), got {self.min_lr}")
        if not 0 <= self.label_smoothing < 1:
            raise bad(f"--label-smoothing must be in [0, 1), got {self.label_smoothing}")
        if not 0 <= self.kd_alpha <= 1:
            raise bad(f"--kd-alpha must be in [0, 1], got {self.kd_alpha}")
        if not self.kd_temperature > 0:
            raise bad(f"--kd-temperature must be positive, got {self.kd_temperature}")
        if self.amp not in ("auto", "off", "bf16", "fp16"):
            raise bad(f"--amp must be auto, off, bf16 or fp16, got {self.amp!r}")
        if self.grad_clip is not None and not self.grad_clip > 0:
            raise bad(f"--grad-clip must be positive, got {self.grad_clip}")
        for name in ("eval_every", "save_every", "eval_batch_size", "val_images"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise bad(f"--{name.replace('_', '-')} must be at least 1, got {value}")
        if self.log_every < 1:
            raise bad(f"--log-every must be at least 1, got {self.log_every}")
        if self.workers < 0:
            raise bad(f"--workers must be 0 or more, got {self.workers}")

    def result_fields(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in _RESULT_FIELDS}


# --------------------------------------------------------------------------------------------
# losses, optimizer, schedule


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Hinton et al.'s distillation term: T² · KL(softmax(t/T) ‖ softmax(s/T)), batch mean.

    The T² factor keeps its gradient scale independent of the temperature.
    """
    t = float(temperature)
    s = F.log_softmax(student_logits.float() / t, dim=-1)
    q = F.log_softmax(teacher_logits.float() / t, dim=-1)
    return F.kl_div(s, q, log_target=True, reduction="batchmean") * (t * t)


def param_groups(model: nn.Module, cfg: TrainConfig) -> list[dict[str, Any]]:
    """Two groups: weights with decay, and (unless `decay_norm_and_bias`) 1-D parameters without."""
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    for _, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 and not cfg.decay_norm_and_bias else decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay, "base_lr": cfg.lr, "scheduled": True, "name": "weights"}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0, "base_lr": cfg.lr, "scheduled": True, "name": "norm+bias"})
    return [g for g in groups if g["params"]]


def build_optimizer(model: nn.Module, cfg: TrainConfig, extra_groups: Sequence[dict[str, Any]] = ()) -> torch.optim.Optimizer:
    """SGD over `param_groups(model)` plus hook groups (each may set its own lr/decay/"scheduled")."""
    groups = param_groups(model, cfg)
    for g in extra_groups:
        g = dict(g)
        g.setdefault("base_lr", g.get("lr", cfg.lr))
        g.setdefault("weight_decay", 0.0)
        g.setdefault("scheduled", True)
        groups.append(g)
    if not groups:
        raise UserError("the model has no trainable parameters")
    nesterov = cfg.nesterov and cfg.momentum > 0
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=nesterov)


class WarmupCosine:
    """lr(step) = base·(step+1)/W during the W warm-up steps, then cosine from base to `min_lr`
    at `total`. A pure function of the step (its state is the step), applied to every param group
    flagged "scheduled" before each optimizer step. `start` shifts the schedule (a phase that
    begins later, e.g. after a pruning event, gets its own warm-up and decay)."""

    def __init__(self, total: int, warmup: float, min_lr: float = 0.0, start: int = 0) -> None:
        self.total = int(total)
        self.start = int(start)
        span = max(self.total - self.start, 1)
        self.warmup = int(round(warmup * span)) if warmup < 1 else int(warmup)
        self.warmup = min(self.warmup, span)
        self.min_lr = float(min_lr)

    def factor(self, step: int) -> float:
        """Multiplier of the base lr for the optimizer step that follows `step` completed steps."""
        s = step - self.start
        span = max(self.total - self.start, 1)
        if s < 0:
            return 1.0
        if self.warmup > 0 and s < self.warmup:
            return (s + 1) / self.warmup
        rest = max(span - self.warmup, 1)
        progress = min(max((s - self.warmup) / rest, 0.0), 1.0)
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    def lr(self, base: float, step: int) -> float:
        floor = min(self.min_lr, base)
        return floor + (base - floor) * self.factor(step)

    def apply(self, optimizer: torch.optim.Optimizer, step: int) -> float:
        lr0 = None
        for g in optimizer.param_groups:
            if g.get("scheduled", True):
                g["lr"] = self.lr(g.get("base_lr", g["lr"]), step)
            lr0 = g["lr"] if lr0 is None else lr0
        return float(lr0 or 0.0)

    def state_dict(self) -> dict[str, Any]:
        return {"total": self.total, "start": self.start, "warmup": self.warmup, "min_lr": self.min_lr}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.total, self.start = int(state["total"]), int(state["start"])
        self.warmup, self.min_lr = int(state["warmup"]), float(state["min_lr"])


# --------------------------------------------------------------------------------------------
# data: deterministic per-(seed, epoch, index) sampling and augmentation


def mix_seed(*values: int) -> int:
    """A 63-bit seed from integers (splitmix64-style), for independent, reproducible streams."""
    h = 0x9E3779B97F4A7C15
    for v in values:
        h = ((h ^ (int(v) & _MASK64)) * 0xBF58476D1CE4E5B9) & _MASK64
        h ^= h >> 31
        h = (h * 0x94D049BB133111EB) & _MASK64
        h ^= h >> 29
    return h & 0x7FFF_FFFF_FFFF_FFFF


class KeyedDataset(Dataset[Any]):
    """Wraps a data set so that item `(key, i)` is sample i with its augmentation seeded by (key, i)."""

    def __init__(self, base: Dataset[Any]) -> None:
        self.base = base

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, item: tuple[int, int]) -> Any:
        key, index = item
        reseed = getattr(self.base, "reseed", None)
        if callable(reseed):
            reseed(mix_seed(key, index))
        return self.base[index]


class EpochBatches(Sampler[list[tuple[int, int]]]):
    """Global batches `start..stop-1` of one epoch; this rank's contiguous share of each.

    Global batch k is positions [k·G, (k+1)·G) of a permutation seeded by (seed, epoch); rank r of
    W takes its r-th slice of G/W samples. Resuming at step s of an epoch just starts at k = s.
    """

    def __init__(self, n: int, global_batch: int, *, seed: int, epoch: int, start: int, stop: int,
                 rank: int = 0, world: int = 1, shuffle: bool = True) -> None:
        self.n, self.global_batch, self.seed, self.epoch = n, global_batch, seed, epoch
        self.start, self.stop, self.rank, self.world, self.shuffle = start, stop, rank, world, shuffle
        self.local = global_batch // world

    def __len__(self) -> int:
        return max(self.stop - self.start, 0)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        if self.shuffle:
            g = torch.Generator().manual_seed(mix_seed(self.seed, self.epoch, 0x5A))
            perm = torch.randperm(self.n, generator=g)
        else:
            perm = torch.arange(self.n)
        key = mix_seed(self.seed, self.epoch, 0xA5)
        for k in range(self.start, self.stop):
            base = k * self.global_batch + self.rank * self.local
            yield [(key, int(i)) for i in perm[base:base + self.local].tolist()]


def _collate_labels(batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
    xs, ys = zip(*[(b[0], b[1]) for b in batch])
    return torch.stack(xs), torch.as_tensor(ys, dtype=torch.long)


# --------------------------------------------------------------------------------------------
# validation


@torch.inference_mode()
def validate(model: nn.Module, dataset: Dataset[Any], device: torch.device, *, batch_size: int = 256,
             workers: int = 0, env: D.DistEnv | None = None, channels_last: bool = False,
             amp_dtype: torch.dtype | None = None, max_images: int | None = None) -> dict[str, float | int]:
    """Top-1/top-5 (percent), mean cross-entropy and image count; sharded over ranks and summed."""
    from ..criteria.gates import logits_of

    env = env or D.current()
    n = len(dataset)  # type: ignore[arg-type]
    chosen = list(range(n))
    if max_images is not None and max_images < n:
        # A fixed random subset (data sets are often sorted by class), the same in every run.
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(0))[:max_images]
        chosen = sorted(perm.tolist())
    indices = chosen[env.rank::env.world_size]
    loader = DataLoader(torch.utils.data.Subset(dataset, indices), batch_size=batch_size, shuffle=False,
                        num_workers=workers, collate_fn=_collate_labels, pin_memory=device.type == "cuda")
    was_training = model.training
    model.eval()
    sums = torch.zeros(4, dtype=torch.float64)  # correct1, correct5, loss, images
    try:
        for x, y in loader:
            x = x.to(device, non_blocking=True)
            if channels_last and x.dim() == 4:
                x = x.contiguous(memory_format=torch.channels_last)
            y = y.to(device, non_blocking=True)
            with _autocast(device, amp_dtype):
                logits = logits_of(model(x)).float()
            if y.numel() and int(y.max()) >= logits.shape[1]:
                raise UserError(f"validation data has labels up to {int(y.max())} but the model outputs "
                                f"{logits.shape[1]} classes; check --val-data and the checkpoint")
            k = min(5, logits.shape[1])
            hits = logits.topk(k, dim=1).indices.eq(y[:, None])
            sums += torch.tensor([float(hits[:, 0].sum()), float(hits.any(1).sum()),
                                  float(F.cross_entropy(logits, y, reduction="sum")), float(y.numel())],
                                 dtype=torch.float64)
    finally:
        model.train(was_training)
    D.all_reduce_sum_(sums, env)
    images = int(sums[3])
    if images == 0:
        raise UserError("no validation images: --val-data is empty")
    return {"top1": 100.0 * float(sums[0]) / images, "top5": 100.0 * float(sums[1]) / images,
            "loss": float(sums[2]) / images, "images": images}


# --------------------------------------------------------------------------------------------
# hooks


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


# --------------------------------------------------------------------------------------------
# outputs and state files


@dataclass(frozen=True)
class OutputPaths:
    """`--out F.safetensors` → F.best.safetensors, F.last.safetensors, F.state.pt beside it."""

    out: Path
    best: Path
    last: Path
    state: Path

    @classmethod
    def for_out(cls, out: str | os.PathLike[str]) -> OutputPaths:
        p = Path(out)
        suffix = p.suffix if p.suffix else ".safetensors"
        stem = p.name[: -len(p.suffix)] if p.suffix else p.name
        return cls(out=p, best=p.with_name(f"{stem}.best{suffix}"), last=p.with_name(f"{stem}.last{suffix}"),
                   state=p.with_name(f"{stem}.state.pt"))


@dataclass
class CheckpointInfo:
    """What a chanprune file written by the trainer records besides the weights."""

    arch: Any  # ArchSpec
    input_shape: tuple[int, int, int]
    history: list[dict[str, Any]] = field(default_factory=list)  # the input checkpoint's history
    plans: list[dict[str, Any]] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)
    entry: dict[str, Any] = field(default_factory=dict)  # this run's history entry (static part)


def _rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": {"name": str(np_state[0]), "keys": torch.from_numpy(np.asarray(np_state[1], dtype=np.int64)),
                  "pos": int(np_state[2]), "has_gauss": int(np_state[3]), "cached": float(np_state[4])},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: Mapping[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def load_train_state(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a training-state file (weights-only unpickling; no code runs)."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"no training state at {p} to resume from (it is written during `chanprune finetune` "
                        "and removed when the run completes)")
    try:
        state = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise UserError(f"training state {p} is unreadable ({str(exc).splitlines()[0][:160] if str(exc) else type(exc).__name__})") from None
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise UserError(f"{p} is not a chanprune training state")
    if int(state.get("version", 0)) > STATE_VERSION:
        raise UserError(f"{p} was written by a newer chanprune; upgrade chanprune to resume it")
    return state


def model_from_state(state: Mapping[str, Any]) -> nn.Module:
    """Rebuild the model saved in a training state (its current, possibly pruned, shapes)."""
    from ..engine import shapes
    from ..models import ArchSpec, build_model

    spec = ArchSpec.from_json(state["arch"])
    model = build_model(spec)
    tensors = state["model"]
    shapes.apply_shape_attrs(model, state["module_shapes"], {k: tuple(v.shape) for k, v in tensors.items()})
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    problems = [k for k in missing if not k.endswith("num_batches_tracked")] + list(unexpected)
    if problems:
        raise UserError(f"the training state does not fit {spec}: {', '.join(problems[:3])}")
    return model


# --------------------------------------------------------------------------------------------
# Ctrl-C / SIGTERM: finish the step, save, then stop


class _StopRequest:
    """SIGINT/SIGTERM set a flag checked between steps (a second Ctrl-C aborts at once)."""

    def __init__(self) -> None:
        self.requested = False
        self.signal_name = ""
        self._previous: dict[int, Any] = {}

    def _handler(self, signum: int, frame: Any) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True
        self.signal_name = signal.Signals(signum).name

    def __enter__(self) -> _StopRequest:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                try:
                    self._previous[sig] = signal.signal(sig, self._handler)
                except (ValueError, OSError):  # pragma: no cover - exotic embedding
                    pass
        return self

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()


# --------------------------------------------------------------------------------------------
# the trainer


def _autocast(device: torch.device, dtype: torch.dtype | None) -> Any:
    if dtype is None or device.type != "cuda":
        return nullcontext()
    return torch.autocast("cuda", dtype=dtype)


def resolve_amp(amp: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for `--amp` on `device` (None: full precision)."""
    if amp == "off":
        return None
    if device.type != "cuda":
        if amp == "auto":
            return None
        raise UserError(f"--amp {amp} needs a CUDA device (mixed precision is for GPUs); use --amp off on {device.type}")
    if amp == "fp16":
        return torch.float16
    if amp == "bf16" or torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float16


@dataclass
class TrainResult:
    model: nn.Module
    steps: int
    epochs_done: float
    evals: list[dict[str, Any]]
    best: dict[str, Any] | None
    final: dict[str, Any] | None
    train_images: int
    train_seconds: float
    resumed_from: int | None
    hook_summaries: dict[str, Any]
    plans: list[dict[str, Any]]

    @property
    def images_per_second(self) -> float:
        return self.train_images / self.train_seconds if self.train_seconds > 0 else 0.0


class Trainer:
    """One fine-tuning run. Build it, optionally `restore(state)`, then `fit()`."""

    def __init__(self, model: nn.Module, train_set: Dataset[Any], cfg: TrainConfig, *, device: torch.device,
                 val_set: Dataset[Any] | None = None, teacher: nn.Module | None = None,
                 hooks: Sequence[Hook] = (), env: D.DistEnv | None = None,
                 outputs: OutputPaths | None = None, ckpt: CheckpointInfo | None = None,
                 log: Callable[[str], None] | None = None, on_eval: Callable[[dict[str, Any]], None] | None = None) -> None:
        cfg.check()
        self.cfg = cfg
        self.device = device
        self.env = env or D.current()
        self.train_set = train_set
        self.val_set = val_set
        self.hooks = list(hooks)
        self.outputs = outputs
        self.ckpt = ckpt
        self.log = log or (lambda s: None)
        self.on_eval = on_eval
        self.amp_dtype = resolve_amp(cfg.amp, device)
        self.channels_last = cfg.channels_last if cfg.channels_last is not None else device.type == "cuda"
        self.scaler = torch.amp.GradScaler("cuda") if self.amp_dtype == torch.float16 else None
        self.local_batch = D.local_batch(cfg.batch_size, self.env)
        n = len(train_set)  # type: ignore[arg-type]
        self.steps_per_epoch = n // cfg.batch_size
        if self.steps_per_epoch < 1:
            raise UserError(f"the training data has {n} samples, fewer than one batch of {cfg.batch_size}; "
                            "lower --batch-size")
        epochs = cfg.epochs
        if epochs is None:
            epochs = math.ceil(cfg.max_steps / self.steps_per_epoch) if cfg.max_steps else 1
        self.epochs = epochs
        self.total_steps = epochs * self.steps_per_epoch
        if cfg.max_steps is not None:
            self.total_steps = min(self.total_steps, cfg.max_steps)
        self.scheduler = WarmupCosine(self.total_steps, cfg.warmup, cfg.min_lr)
        self.teacher = teacher
        if teacher is not None:
            teacher.to(device).eval()
            for p in teacher.parameters():
                p.requires_grad_(False)
            if self.channels_last:
                teacher.to(memory_format=torch.channels_last)
        self.step = 0
        self.weights_frozen = False
        self.evals: list[dict[str, Any]] = []
        self.best: dict[str, Any] | None = None
        self.train_images = 0
        self.train_seconds = 0.0
        self.resumed_from: int | None = None
        self._loss_ema: float | None = None
        self._last_lr = 0.0
        self._pending_rng: Any = None
        self.model = model
        self._prepare(model)
        self.optimizer = build_optimizer(self.model, cfg)
        self.ddp_model: nn.Module = self.model  # wrapped in DDP by fit() (after the hooks' setup)
        self._labels_checked = False

    # ---- model management ----------------------------------------------------------------

    def _prepare(self, model: nn.Module) -> None:
        model.to(self.device)
        if self.channels_last:
            model.to(memory_format=torch.channels_last)
        model.train()

    def _wrap(self) -> None:
        if self.env.distributed:
            from torch.nn.parallel import DistributedDataParallel as DDP

            ids = [self.device.index] if self.device.type == "cuda" else None
            self.ddp_model = DDP(self.model, device_ids=ids, output_device=ids[0] if ids else None)
        else:
            self.ddp_model = self.model

    def _hook_groups(self) -> list[dict[str, Any]]:
        return [g for h in self.hooks for g in h.param_groups(self)]

    def rebuild_optimizer(self) -> None:
        """A fresh optimizer for the current parameters (hooks' groups included)."""
        self.optimizer = build_optimizer(self.model, self.cfg, self._hook_groups())

    def replace_model(self, new_model: nn.Module, *, graph: Any = None, plan: Mapping[int, Sequence[int]] | None = None) -> None:
        """Continue training `new_model` (e.g. after surgery). With the `graph` and `plan` that
        turned the current model into it, the momentum buffers of surviving weights are carried
        over by applying the same surgery to them; otherwise the optimizer starts fresh."""
        old_model, old_opt = self.model, self.optimizer
        self._prepare(new_model)
        self.model = new_model
        self.rebuild_optimizer()
        if graph is not None and plan is not None:
            _carry_momentum(old_model, old_opt, new_model, self.optimizer, graph, plan)
        self._wrap()

    # ---- state -----------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        from ..engine import shapes

        if self.ckpt is None:
            raise ChanpruneError("internal: the trainer has no checkpoint info to save a state")
        rng = D.all_gather_objects(_rng_state(), self.env)
        return {
            "format": STATE_FORMAT,
            "version": STATE_VERSION,
            "step": self.step,
            "total_steps": self.total_steps,
            "world_size": self.env.world_size,
            "config": self.cfg.result_fields(),
            "arch": self.ckpt.arch.to_json(),
            "module_shapes": shapes.shape_attrs(self.model),
            "model": {k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()},
            "optimizer": _cpu(self.optimizer.state_dict()),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "rng": rng,
            "hooks": {h.name: h.state_dict() for h in self.hooks},
            "evals": list(self.evals),
            "best": self.best,
            "train_images": self.train_images,
            "train_seconds": self.train_seconds,
        }

    def check_resumable(self, state: Mapping[str, Any]) -> None:
        """UserError when `state` was made with options that change the result."""
        saved = dict(state.get("config") or {})
        now = self.cfg.result_fields()
        diffs = [f"{k}: {saved.get(k)!r} then, {now[k]!r} now" for k in now if saved.get(k) != now[k]]
        if diffs:
            raise UserError("cannot resume with different training options (" + "; ".join(diffs[:4])
                            + "); repeat the original command line with --resume")
        if int(state.get("world_size", 1)) != self.env.world_size:
            raise UserError(f"the state was saved by {state.get('world_size')} process(es); resume with the same "
                            f"number (now {self.env.world_size}) for an identical result")
        hooks_then = set((state.get("hooks") or {}).keys())
        hooks_now = {h.name for h in self.hooks}
        if hooks_then != hooks_now:
            raise UserError(f"the state was saved with schedule(s) {sorted(hooks_then) or ['none']}, "
                            f"now {sorted(hooks_now) or ['none']}; use the same --schedule")

    def restore(self, state: Mapping[str, Any]) -> None:
        """Continue from `state` (the model must already have the saved weights and shapes)."""
        self.check_resumable(state)
        hooks = state.get("hooks") or {}
        for h in self.hooks:
            h.load_state_dict(hooks.get(h.name) or {})
        self.step = int(state["step"])
        self.resumed_from = self.step
        self.scheduler.load_state_dict(state["scheduler"])
        if state.get("scaler") is not None and self.scaler is not None:
            self.scaler.load_state_dict(state["scaler"])
        self.evals = list(state.get("evals") or [])
        self.best = state.get("best")
        self.train_images = int(state.get("train_images", 0))
        self.train_seconds = float(state.get("train_seconds", 0.0))
        self._pending_optimizer = state["optimizer"]
        rng = state.get("rng") or []
        self._pending_rng = rng[self.env.rank] if self.env.rank < len(rng) else None

    def _save_model(self, path: Path, *, kind: str, evaluation: dict[str, Any] | None = None) -> None:
        from ..checkpoint import save_chanprune, tool_version

        assert self.ckpt is not None
        entry = {**self.ckpt.entry, "steps": self.step, "total_steps": self.total_steps, "checkpoint": kind,
                 "validation": evaluation, "schedules": {h.name: h.summary() for h in self.hooks},
                 "tool_version": tool_version()}
        plans = [*self.ckpt.plans, *[p for h in self.hooks for p in h.plans()]]
        model = self.model
        save_chanprune(path, model, self.ckpt.arch, input_shape=self.ckpt.input_shape,
                       history=[*self.ckpt.history, entry], plans=plans, meta=self.ckpt.meta, force=True)

    def save_state(self) -> None:
        """Write `<out>.last` (chanprune) and `<out>.state.pt` atomically (rank 0), then sync."""
        if self.outputs is None:
            return
        state = self.state_dict()  # collective (RNG gather): every rank takes part
        if self.env.is_main:
            self._save_model(self.outputs.last, kind="last", evaluation=self.evals[-1] if self.evals else None)
            with atomic_path(self.outputs.state) as tmp:
                torch.save(state, tmp)
        D.barrier(self.env)

    # ---- one step --------------------------------------------------------------------------

    def loss_scale(self) -> float:
        """The fp16 gradient scale (1 without a scaler): hooks divide raw .grad by it."""
        return float(self.scaler.get_scale()) if self.scaler is not None else 1.0

    def _train_step(self, x: torch.Tensor, y: torch.Tensor) -> float:
        from ..criteria.gates import logits_of

        cfg = self.cfg
        x = x.to(self.device, non_blocking=True)
        y = y.to(self.device, non_blocking=True)
        if self.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        for h in self.hooks:
            h.before_forward(self, x, y)
        with _autocast(self.device, self.amp_dtype):
            logits = logits_of(self.ddp_model(x))
        logits = logits.float()
        if not self._labels_checked:  # once: a per-step check would synchronise CUDA every step
            self._labels_checked = True
            if y.numel() and int(y.max()) >= logits.shape[-1]:
                raise UserError(f"training data has labels up to {int(y.max())} but the model outputs "
                                f"{logits.shape[-1]} classes; check --data and the checkpoint")
        loss = F.cross_entropy(logits, y, label_smoothing=cfg.label_smoothing)
        if self.teacher is not None and cfg.kd_alpha > 0:
            with torch.no_grad(), _autocast(self.device, self.amp_dtype):
                t_logits = logits_of(self.teacher(x)).float()
            loss = (1 - cfg.kd_alpha) * loss + cfg.kd_alpha * kd_loss(logits, t_logits, cfg.kd_temperature)
        for h in self.hooks:
            extra = h.extra_loss(self, logits, y)
            if extra is not None:
                loss = loss + extra
        if not torch.isfinite(loss.detach()):
            raise ChanpruneError(f"the training loss became {float(loss.detach())} at step {self.step + 1}; "
                                 "lower --lr (or use --grad-clip)")
        self._last_lr = self.scheduler.apply(self.optimizer, self.step)
        if self.weights_frozen:  # a hook trains only its own parameters for now
            for g in self.optimizer.param_groups:
                if g.get("scheduled", True):
                    g["lr"] = 0.0
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
        else:
            loss.backward()
        for h in self.hooks:
            h.after_backward(self, logits.detach(), y)
        if cfg.grad_clip is not None:
            if self.scaler is not None:
                self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())

    # ---- evaluation ------------------------------------------------------------------------

    def evaluate(self, *, epoch: float, train_loss: float | None, final: bool = False) -> dict[str, Any] | None:
        if self.val_set is None:
            return None
        bs = self.cfg.eval_batch_size or max(self.local_batch, 128)
        result = validate(self.model, self.val_set, self.device, batch_size=bs, workers=self.cfg.workers,
                          env=self.env, channels_last=self.channels_last, amp_dtype=self.amp_dtype,
                          max_images=self.cfg.val_images)
        row = {"step": self.step, "epoch": round(epoch, 3), "train_loss": train_loss, "lr": self._last_lr,
               **result, "final_architecture": all(h.final_architecture for h in self.hooks), "best": False}
        if row["final_architecture"] and (self.best is None or row["top1"] > self.best["top1"]):
            row["best"] = True
            self.best = dict(row)
            if self.outputs is not None and self.env.is_main:
                self._save_model(self.outputs.best, kind="best", evaluation=row)
            D.barrier(self.env)
        self.evals.append(row)
        if self.on_eval is not None and self.env.is_main:
            self.on_eval(row)
        return row

    # ---- the loop --------------------------------------------------------------------------

    def _loader(self, epoch: int, start: int, stop: int) -> DataLoader[Any]:
        sampler = EpochBatches(len(self.train_set), self.cfg.batch_size, seed=self.cfg.seed, epoch=epoch,  # type: ignore[arg-type]
                               start=start, stop=stop, rank=self.env.rank, world=self.env.world_size)
        return DataLoader(KeyedDataset(self.train_set), batch_sampler=sampler, num_workers=self.cfg.workers,
                          collate_fn=_collate_labels, pin_memory=self.device.type == "cuda",
                          persistent_workers=False)

    def fit(self) -> TrainResult:
        cfg = self.cfg
        if self.resumed_from is None:
            torch.manual_seed(cfg.seed)
            random.seed(cfg.seed)
            np.random.seed(cfg.seed % 2**32)
        for h in self.hooks:
            h.on_train_start(self)
        # Hooks may have added parameter groups or changed the model on start: build the optimizer
        # now, then restore a resumed run's optimizer and RNG streams.
        self.rebuild_optimizer()
        pending = getattr(self, "_pending_optimizer", None)
        if pending is not None:
            self.optimizer.load_state_dict(pending)
            self._pending_optimizer = None
        if self._pending_rng is not None:
            _set_rng_state(self._pending_rng)
            self._pending_rng = None
        self._wrap()
        progress = _ProgressBar(self, enabled=cfg.progress and self.env.is_main)
        loss_sum, loss_n = 0.0, 0
        with _StopRequest() as stop, progress:
            while self.step < self.total_steps:
                epoch = self.step // self.steps_per_epoch
                start = self.step - epoch * self.steps_per_epoch
                stop_at = min(self.steps_per_epoch, self.total_steps - epoch * self.steps_per_epoch)
                t_data = time.perf_counter()
                for x, y in self._loader(epoch, start, stop_at):
                    loss = self._train_step(x, y)
                    self.step += 1
                    if self.device.type == "cuda":
                        torch.cuda.synchronize(self.device)
                    now = time.perf_counter()
                    self.train_seconds += now - t_data
                    self.train_images += x.shape[0] * self.env.world_size
                    self._loss_ema = loss if self._loss_ema is None else 0.9 * self._loss_ema + 0.1 * loss
                    loss_sum, loss_n = loss_sum + loss, loss_n + 1
                    for h in self.hooks:
                        h.on_step_end(self)
                    progress.update(loss)
                    epoch_end = self.step % self.steps_per_epoch == 0
                    if epoch_end:
                        for h in self.hooks:
                            h.on_epoch_end(self, epoch)
                    last = self.step == self.total_steps
                    due_eval = (cfg.eval_every is not None and self.step % cfg.eval_every == 0) or (
                        cfg.eval_every is None and epoch_end)
                    if due_eval and not last:
                        progress.pause()
                        self.evaluate(epoch=self.step / self.steps_per_epoch, train_loss=loss_sum / max(loss_n, 1))
                        loss_sum, loss_n = 0.0, 0
                        progress.resume()
                    due_save = epoch_end or last or (cfg.save_every is not None and self.step % cfg.save_every == 0)
                    stopping = D.any_rank(stop.requested, self.env) if (self.env.distributed or stop.requested) else False
                    if due_save or stopping:
                        self.save_state()
                    if stopping:
                        progress.pause()
                        where = self.outputs.state if self.outputs is not None else "memory"
                        self.log(f"stopped by {stop.signal_name or 'a signal'} after step {self.step}/{self.total_steps}; "
                                 f"state saved to {where}: re-run the same command with --resume to continue")
                        raise KeyboardInterrupt
                    t_data = time.perf_counter()
        for h in self.hooks:
            h.on_train_end(self)
        final = self.evaluate(epoch=self.step / self.steps_per_epoch, train_loss=loss_sum / max(loss_n, 1) if loss_n else None,
                              final=True)
        return TrainResult(model=self.model, steps=self.step, epochs_done=self.step / self.steps_per_epoch,
                           evals=self.evals, best=self.best, final=final, train_images=self.train_images,
                           train_seconds=self.train_seconds, resumed_from=self.resumed_from,
                           hook_summaries={h.name: h.summary() for h in self.hooks},
                           plans=[p for h in self.hooks for p in h.plans()])


def _cpu(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _cpu(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_cpu(v) for v in obj]
    return obj


@torch.no_grad()
def _carry_momentum(old_model: nn.Module, old_opt: torch.optim.Optimizer, new_model: nn.Module,
                    new_opt: torch.optim.Optimizer, graph: Any, plan: Mapping[int, Sequence[int]]) -> None:
    """Slice the old momentum buffers exactly as surgery sliced the weights, into the new optimizer."""
    from ..engine.surgery import prune_model

    shadow = copy.deepcopy(old_model).cpu()
    old_params = dict(old_model.named_parameters())
    have: set[str] = set()
    for name, p in shadow.named_parameters():
        buf = old_opt.state.get(old_params[name], {}).get("momentum_buffer")
        if buf is not None and tuple(buf.shape) == tuple(p.shape):
            p.copy_(buf.detach().cpu())
            have.add(name)
    prune_model(shadow, graph, plan)
    sliced = dict(shadow.named_parameters())
    for name, p in new_model.named_parameters():
        if name in have and name in sliced and tuple(sliced[name].shape) == tuple(p.shape):
            # empty_like keeps the parameter's memory format (channels-last on CUDA).
            new_opt.state[p]["momentum_buffer"] = torch.empty_like(p).copy_(sliced[name].detach())


class _ProgressBar:
    """Rich progress (stderr terminal) with loss / lr / images per second; log lines otherwise."""

    def __init__(self, trainer: Trainer, enabled: bool) -> None:
        self.trainer = trainer
        self.enabled = enabled
        self.tty = enabled and stderr_is_terminal()
        self.bar: Any = None
        self.task: Any = None
        self._paused = False

    def __enter__(self) -> _ProgressBar:
        if self.tty:
            self.bar = progress_bar("info")
            self.bar.__enter__()
            self.task = self.bar.add_task("training", total=self.trainer.total_steps, completed=self.trainer.step, info="")
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.bar is not None:
            self.bar.__exit__(*exc)
            self.bar = None

    def _info(self) -> str:
        t = self.trainer
        rate = t.train_images / t.train_seconds if t.train_seconds > 0 else 0.0
        epoch = t.step / t.steps_per_epoch
        return f"epoch {epoch:.2f}  loss {t._loss_ema or 0:.4f}  lr {t._last_lr:.3g}  {rate:,.0f} img/s"

    def update(self, loss: float) -> None:
        if not self.enabled:
            return
        t = self.trainer
        if self.bar is not None:
            self.bar.update(self.task, completed=t.step, info=self._info())
        elif t.step % t.cfg.log_every == 0 or t.step == t.total_steps or t.step == 1:
            print(f"step {t.step}/{t.total_steps}  {self._info()}", file=sys.stderr, flush=True)

    def pause(self) -> None:
        if self.bar is not None and not self._paused:
            self.bar.stop()
            self._paused = True

    def resume(self) -> None:
        if self.bar is not None and self._paused:
            self.bar.start()
            self._paused = False


# --------------------------------------------------------------------------------------------
# smoke check used by coverage sweeps


def train_step_check(model: nn.Module, input_shape: Sequence[int], *, batch: int = 2, steps: int = 1,
                     device: torch.device | str = "cpu", seed: int = 0) -> float:
    """Run `steps` SGD steps of this loop's optimizer on random data (train mode); return the last
    loss. Raises ChanpruneError when the loss is not finite or a parameter gets no gradient."""
    from ..criteria.gates import logits_of

    device = torch.device(device)
    g = torch.Generator().manual_seed(seed)
    model.to(device).train()
    cfg = TrainConfig(lr=1e-3)
    opt = build_optimizer(model, cfg)
    loss_value = float("nan")
    for _ in range(steps):
        x = torch.randn((batch, *input_shape), generator=g).to(device)
        logits = logits_of(model(x)).float()
        y = torch.randint(0, logits.shape[-1], (batch,), generator=g).to(device)
        loss = F.cross_entropy(logits, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        no_grad = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
        opt.step()
        loss_value = float(loss.detach())
        if not math.isfinite(loss_value):
            raise ChanpruneError(f"training step gives a non-finite loss ({loss_value})")
        if no_grad:
            raise ChanpruneError(f"no gradient reaches {', '.join(no_grad[:3])}")
    return loss_value


@contextmanager
def threads(n: int | None) -> Iterator[None]:
    """Run with `n` intra-op threads (None: leave torch's default), restored afterwards."""
    if n is None:
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(max(1, n))
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def config_dict(cfg: TrainConfig) -> dict[str, Any]:
    return asdict(cfg)
