"""`Trainer`: one fine-tuning run, the loop behind `chanprune finetune`.

What one run does, in order:

* data: the batches of `sampling.EpochBatches`, so the run is a pure function of the seed and a
  resumed run continues exactly where the interrupted one stopped; served by `inputs.TrainInputs`
  (small images as one tensor on the device, else loader workers), the same batches either way;
* the host waits for the device only at sync points (log lines, a throttled progress display,
  validation, saves, every `SYNC_EVERY` steps on CUDA; every step on the CPU or with hooks): the
  losses of the steps since the last one are checked there (a non-finite loss names its step);
* optional `torch.compile` of the forward passes (`--compile`, without schedules);
* optimisation: `optim.build_optimizer` (SGD, weight decay on conv/linear weights only) under the
  `optim.WarmupCosine` schedule, the task loss on labels (`losses.TaskLoss`: cross-entropy, binary
  cross-entropy or squared error), optional label smoothing, optional knowledge distillation from a
  teacher (`optim.kd_loss`, weighted with cross-entropy), optional gradient clipping; or, without
  labels, distillation alone (`distill.Distillation`: the teacher's outputs, any model), with the
  teacher gap measured on held-out images at every validation;
* on CUDA: mixed precision (bf16, or fp16 with a gradient scaler) and channels-last memory;
* under torchrun: DistributedDataParallel (NCCL on GPUs, gloo on CPUs), validation sharded over
  ranks, only rank 0 prints and writes;
* hooks (`hooks.Hook`) plug training-time pruning schedules into the loop (`schedules/`);
  `Trainer.replace_model` rebuilds the optimizer after surgery, carrying momentum buffers through;
* outputs (`outputs.OutputPaths`): `--out` gets the final model, `<out>.best` the best validated
  one, `<out>.last` + `<out>.state.pt` the resumable state (weights, optimizer, scheduler,
  scaler, RNG, step, hook state), written atomically every `save_every` steps, at epoch ends and
  on Ctrl-C / SIGTERM (to the process or its whole group: loader workers leave signals to the main
  process), after which the run ends with `process.Stopped`. `--resume` continues from it with the
  same result as an uninterrupted run.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import Dataset

from ..errors import ChanpruneError, UserError
from ..measure import logits_of
from ..support import distributed as D
from ..support.fsutil import atomic_path
from ..support.progress import StepProgress
from .config import TrainConfig
from .distill import Distillation, set_inference_layers
from .hooks import Hook
from .inputs import TrainInputs, default_workers, tensor_images_for
from .losses import TaskLoss
from .optim import WarmupCosine, build_optimizer, carry_momentum, kd_loss
from .outputs import CheckpointInfo, OutputPaths
from .precision import autocast, resolve_amp
from .process import StopRequest
from .state import STATE_FORMAT, STATE_VERSION, rng_state, set_rng_state, to_cpu
from .validation import validate

SYNC_EVERY = 50  # steps between sync points on CUDA (at most: log lines and validation add their own)
_SHOW_EVERY_S = 0.5  # the progress display reads the device's loss at most this often


@dataclass
class TrainResult:
    """What `Trainer.fit()` returns: the trained model, the validations, throughput and what hooks did."""

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
    input_path: str = "loader"  # "tensor" (images on the device), "loader" (decoded per step) or "device-decode"
    workers: int = 0
    teacher_gap: dict[str, float | None] | None = None  # label-free distillation: {before, after}

    @property
    def images_per_second(self) -> float:
        return self.train_images / self.train_seconds if self.train_seconds > 0 else 0.0


class Trainer:
    """One fine-tuning run. Build it, optionally `restore(state)`, then `fit()`."""

    def __init__(self, model: nn.Module, train_set: Dataset[Any], cfg: TrainConfig, *, device: torch.device,
                 val_set: Dataset[Any] | None = None, teacher: nn.Module | None = None,
                 hooks: Sequence[Hook] = (), env: D.DistEnv | None = None,
                 outputs: OutputPaths | None = None, ckpt: CheckpointInfo | None = None,
                 log: Callable[[str], None] | None = None, on_eval: Callable[[dict[str, Any]], None] | None = None,
                 distillation: Distillation | None = None, train_indices: Sequence[int] | None = None,
                 task_loss: TaskLoss | None = None) -> None:
        """`distillation` (with `teacher`): train on the distillation loss alone, no labels read
        (`distill.Distillation`, already prepared); `train_indices`: the samples of `train_set` to
        train on (the others held out), default all; `task_loss`: the loss on labels (`losses.choose_loss`;
        default cross-entropy on logits)."""
        cfg.check()
        if distillation is not None and (teacher is None or hooks):
            raise UserError("label-free distillation trains on a teacher's outputs alone: give --teacher, and no "
                            "--schedule (the schedules read labels or class logits)")
        self.cfg = cfg
        self.task_loss = task_loss or TaskLoss()
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
        # The teacher only runs forward, which channels-last speeds up on the CPU too (ResNet-56:
        # 1.3-1.4x); the trained model stays contiguous there unless asked, since PyTorch's CPU
        # batch-norm backward is slow in channels-last at the odd widths pruning leaves (BENCHMARKS.md).
        self.teacher_channels_last = self.channels_last or device.type == "cpu"
        self.scaler = torch.amp.GradScaler("cuda") if self.amp_dtype == torch.float16 else None
        self.local_batch = D.local_batch(cfg.batch_size, self.env)
        n = len(train_indices) if train_indices is not None else len(train_set)  # type: ignore[arg-type]
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
        if cfg.compile and self.hooks:
            raise UserError("--compile needs --schedule none: pruning schedules change the model while it trains")
        self.workers = cfg.workers if cfg.workers is not None else default_workers(device)
        self.inputs = TrainInputs(train_set, batch_size=cfg.batch_size, steps_per_epoch=self.steps_per_epoch,
                                  seed=cfg.seed, workers=self.workers, device=device, env=self.env,
                                  tensor=cfg.tensor_cache, device_decode=cfg.device_decode, indices=train_indices)
        # --tensor-cache insists for the training data only; validation data uses it when it can.
        self.val_images = None if val_set is None else tensor_images_for(
            val_set, device=device, workers=self.workers, wanted=None if cfg.tensor_cache else cfg.tensor_cache,
            role="validation")
        # Host work per step only where the device runs ahead of the host: CUDA, without hooks
        # (which read the model or its gradients every step anyway).
        self._sync_every = SYNC_EVERY if device.type == "cuda" and not self.hooks else 1
        self.teacher = teacher
        self.distillation = distillation
        self.gap_before: float | None = None
        if teacher is not None:
            teacher.to(device)
            if distillation is not None:  # the student's training-mode outputs, inference-mode layers
                set_inference_layers(teacher)
                distillation.projections.to(device)
            else:
                teacher.eval()
            for p in teacher.parameters():
                p.requires_grad_(False)
            if self.teacher_channels_last:
                teacher.to(memory_format=torch.channels_last)
        self.teacher_forward: Any = teacher  # compiled by _wrap() with --compile
        self._first_step_done = False
        self.step = 0
        self.weights_frozen = False
        self.evals: list[dict[str, Any]] = []
        self.best: dict[str, Any] | None = None
        self.train_images = 0
        self.train_seconds = 0.0
        self.resumed_from: int | None = None
        self._loss_ema: float | None = None
        self._loss_sum, self._loss_n = 0.0, 0
        self._pending_losses: list[torch.Tensor] = []  # since the last sync point, on the device
        self._mark = 0.0  # perf_counter() at the last sync point (train_seconds counts from it)
        self._shown_at = -math.inf
        self._shown = ""
        self._last_lr = 0.0
        self._pending_optimizer: Any = None  # restored once fit() has built the optimizer
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
        if self.distillation is not None and self.distillation.frozen_statistics:
            set_inference_layers(model)  # computes in training what it is measured on: the teacher's function
        else:
            model.train()

    def _wrap(self) -> None:
        if self.env.distributed:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.ddp_model = DDP(self.model, device_ids=ids, output_device=ids[0] if ids else None)
        else:
            self.ddp_model = self.model
        self.teacher_forward = self.teacher
        if self.cfg.compile:
            self.ddp_model = _compiled(self.ddp_model)
            if self.teacher is not None:
                self.teacher_forward = _compiled(self.teacher)

    def _hook_groups(self) -> list[dict[str, Any]]:
        groups = [g for h in self.hooks for g in h.param_groups(self)]
        return groups + (self.distillation.param_groups() if self.distillation is not None else [])

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
            carry_momentum(old_model, old_opt, new_model, self.optimizer, graph, plan)
        self._wrap()

    # ---- state -----------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        from ..engine import shapes  # not at the top: see the package docstring

        if self.ckpt is None:
            raise ChanpruneError("internal: the trainer has no checkpoint info to save a state")
        rng = D.all_gather_objects(rng_state(), self.env)
        return {
            "format": STATE_FORMAT,
            "version": STATE_VERSION,
            "step": self.step,
            "total_steps": self.total_steps,
            "world_size": self.env.world_size,
            "config": self.cfg.result_fields(),
            "arch": self.ckpt.arch.to_json() if self.ckpt.arch is not None else None,  # None: a pickled model
            "module_shapes": shapes.shape_attrs(self.model),
            "model": {k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()},
            "optimizer": to_cpu(self.optimizer.state_dict()),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "rng": rng,
            "hooks": {h.name: h.state_dict() for h in self.hooks},
            **({"distillation": {**self.distillation.state_dict(), "gap_before": self.gap_before}}
               if self.distillation is not None else {}),
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
        if ("distillation" in state) != (self.distillation is not None):
            then = "label-free distillation" if "distillation" in state else "training on labels"
            raise UserError(f"the state was saved by {then}; repeat the original command line with --resume")

    def restore(self, state: Mapping[str, Any]) -> None:
        """Continue from `state` (the model must already have the saved weights and shapes)."""
        self.check_resumable(state)
        hooks = state.get("hooks") or {}
        for h in self.hooks:
            h.load_state_dict(hooks.get(h.name) or {})
        if self.distillation is not None:
            self.distillation.load_state_dict(state["distillation"])
            self.distillation.projections.to(self.device)
            self.gap_before = state["distillation"].get("gap_before")
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
        from ..checkpoint import LoadedCheckpoint, save_model, tool_version  # not at the top: see the package docstring

        assert self.ckpt is not None
        entry = {**self.ckpt.entry, "steps": self.step, "total_steps": self.total_steps, "checkpoint": kind,
                 "validation": evaluation, "schedules": {h.name: h.summary() for h in self.hooks},
                 "tool_version": tool_version()}
        plans = [*self.ckpt.plans, *[p for h in self.hooks for p in h.plans()]]
        model = self.model
        written_as = LoadedCheckpoint(model, self.ckpt.arch, "chanprune", origin=self.ckpt.origin)
        save_model(path, model, written_as, input_shape=self.ckpt.input_shape,
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

    def _train_step(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """One optimizer step; returns the loss, still on the device (checked at the sync points)."""
        if self._first_step_done or not self.cfg.compile:
            return self._step(x, y)
        try:  # the first call compiles
            loss = self._step(x, y)
        except (UserError, ChanpruneError, KeyboardInterrupt):
            raise
        except Exception as exc:  # noqa: BLE001  (torch.compile fails with many types, e.g. no C++ compiler)
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise UserError(f"--compile: torch.compile failed on this machine ({first[:300]}); run without --compile") from None
        self._first_step_done = True
        return loss

    def _step(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        cfg = self.cfg
        x = x.to(self.device, non_blocking=True)
        y = y.to(self.device, non_blocking=True)
        if self.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        for h in self.hooks:
            h.before_forward(self, x, y)
        if self.distillation is not None:
            return self._optimize(self._distillation_loss(x), None, y)
        with autocast(self.device, self.amp_dtype):
            logits = logits_of(self.ddp_model(x), self.model)
        logits = logits.float()
        if not self._labels_checked:  # once: a per-step check would synchronise CUDA every step
            self._labels_checked = True
            if y.numel() and int(y.max()) >= logits.shape[-1]:
                raise UserError(f"training data has labels up to {int(y.max())} but the model outputs "
                                f"{logits.shape[-1]} classes; check --data and the checkpoint")
        loss = self.task_loss(logits, y, label_smoothing=cfg.label_smoothing)
        if self.teacher is not None and cfg.kd_alpha > 0:
            tx = x.contiguous(memory_format=torch.channels_last) if self.teacher_channels_last and x.dim() == 4 else x
            with torch.no_grad(), autocast(self.device, self.amp_dtype):
                t_logits = logits_of(self.teacher_forward(tx), self.teacher).float()
            loss = (1 - cfg.kd_alpha) * loss + cfg.kd_alpha * kd_loss(logits, t_logits, cfg.kd_temperature)
        for h in self.hooks:
            extra = h.extra_loss(self, logits, y)
            if extra is not None:
                loss = loss + extra
        return self._optimize(loss, logits, y)

    def _distillation_loss(self, x: torch.Tensor) -> torch.Tensor:
        """The label-free loss of one batch: the student's outputs against the teacher's."""
        assert self.distillation is not None and self.teacher is not None
        with autocast(self.device, self.amp_dtype):
            output = self.ddp_model(x)
        tx = x.contiguous(memory_format=torch.channels_last) if self.teacher_channels_last and x.dim() == 4 else x
        with torch.no_grad(), autocast(self.device, self.amp_dtype):
            t_output = self.teacher_forward(tx)
        return self.distillation.loss(self.model, self.teacher, output, t_output, self.env)

    def _optimize(self, loss: torch.Tensor, logits: torch.Tensor | None, y: torch.Tensor) -> torch.Tensor:
        """Backward, the hooks' gradient reads, clipping and the optimizer step; returns the loss
        detached (`logits`: the task output the hooks read, None in label-free distillation,
        which has no hooks)."""
        self._last_lr = self.scheduler.apply(self.optimizer, self.step)
        if self.weights_frozen:  # a hook trains only its own parameters for now
            for g in self.optimizer.param_groups:
                if g.get("scheduled", True):
                    g["lr"] = 0.0
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
        else:
            loss.backward()
        if logits is not None:
            for h in self.hooks:
                h.after_backward(self, logits.detach(), y)
        if self.distillation is not None:
            self.distillation.sync_gradients(self.env)
        if self.cfg.grad_clip is not None:
            if self.scaler is not None:
                self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    # ---- evaluation ------------------------------------------------------------------------

    def teacher_gap(self) -> float | None:
        """The teacher gap on the held-out images (label-free distillation; None otherwise)."""
        if self.distillation is None or self.teacher is None:
            return None
        return self.distillation.gap(self.model, self.teacher, self.device, batch_size=self._eval_batch(),
                                     workers=self.workers, env=self.env, channels_last=self.channels_last,
                                     teacher_channels_last=self.teacher_channels_last, amp_dtype=self.amp_dtype,
                                     max_images=self.cfg.val_images)

    def _eval_batch(self) -> int:
        return self.cfg.eval_batch_size or max(self.local_batch, 128)

    def evaluate(self, *, epoch: float, train_loss: float | None, final: bool = False) -> dict[str, Any] | None:
        """Validate (top-1 on labelled --val-data) and, in label-free distillation, measure the
        teacher gap; the best row so far (highest top-1, else lowest gap) is saved as <out>.best."""
        gap = self.teacher_gap()
        if self.val_set is None and gap is None:
            return None
        result: dict[str, Any] = {}
        if self.val_set is not None:
            result = validate(self.model, self.val_images or self.val_set, self.device, batch_size=self._eval_batch(),
                              workers=self.workers, env=self.env, channels_last=self.channels_last,
                              amp_dtype=self.amp_dtype, max_images=self.cfg.val_images, loss=self.task_loss)
        if gap is not None:
            result["teacher_gap"] = gap
        row = {"step": self.step, "epoch": round(epoch, 3), "train_loss": train_loss, "lr": self._last_lr,
               **result, "final_architecture": all(h.final_architecture for h in self.hooks), "best": False}
        # a schedule's architecture validated only at the end: that is the output, not the best of several
        only_at_end = final and self.best is None and any(not r["final_architecture"] for r in self.evals)
        if row["final_architecture"] and not only_at_end and (self.best is None or _better(row, self.best)):
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

    def _sync(self) -> None:
        """A sync point: wait for the device, count the time since the last one as training time,
        and take the losses of the steps since (the first non-finite one stops the run)."""
        if self._pending_losses:
            values = torch.stack(self._pending_losses).float().cpu().tolist()  # one transfer for all
            first = self.step - len(values)
            self._pending_losses.clear()
            for i, value in enumerate(values):
                if not math.isfinite(value):
                    raise ChanpruneError(f"the training loss became {value} at step {first + i + 1}; "
                                         "lower --lr (or use --grad-clip)")
                self._loss_ema = value if self._loss_ema is None else 0.9 * self._loss_ema + 0.1 * value
                self._loss_sum, self._loss_n = self._loss_sum + value, self._loss_n + 1
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        now = time.perf_counter()
        self.train_seconds += now - self._mark
        self._mark = now

    def _take_train_loss(self) -> float | None:
        """Mean training loss since the last validation (None: no step since)."""
        mean = self._loss_sum / self._loss_n if self._loss_n else None
        self._loss_sum, self._loss_n = 0.0, 0
        return mean

    def _progress_text(self) -> str:
        """The progress display's free-text field: epoch, smoothed loss, lr, throughput (a sync point)."""
        self._sync()
        rate = self.train_images / self.train_seconds if self.train_seconds > 0 else 0.0
        epoch = self.step / self.steps_per_epoch
        self._shown = f"epoch {epoch:.2f}  loss {self._loss_ema or 0:.4f}  lr {self._last_lr:.3g}  {rate:,.0f} img/s"
        self._shown_at = time.perf_counter()
        return self._shown

    def _bar_text(self) -> str:
        """`_progress_text` for a progress bar, which asks every step: refreshed every `_SHOW_EVERY_S`."""
        if time.perf_counter() - self._shown_at < _SHOW_EVERY_S:
            return self._shown
        return self._progress_text()

    def fit(self) -> TrainResult:
        try:
            return self._fit()
        finally:
            if self.distillation is not None:
                self.distillation.release()

    def _fit(self) -> TrainResult:
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
        if self._pending_optimizer is not None:
            self.optimizer.load_state_dict(self._pending_optimizer)
            self._pending_optimizer = None
        if self._pending_rng is not None:
            set_rng_state(self._pending_rng)
            self._pending_rng = None
        self._wrap()
        if self.distillation is not None and self.resumed_from is None:
            self.gap_before = self.teacher_gap()
        progress = StepProgress("training", self.total_steps, completed=self.step, log_every=cfg.log_every,
                                enabled=cfg.progress and self.env.is_main)
        with StopRequest() as stop, progress:
            self._mark = time.perf_counter()  # training time counts from here (data loading included)
            for x, y in self.inputs.batches(self.step, self.total_steps):
                self._pending_losses.append(self._train_step(x, y))
                self.step += 1
                self.train_images += x.shape[0] * self.env.world_size
                epoch_end = self.step % self.steps_per_epoch == 0
                last = self.step == self.total_steps
                due_eval = (cfg.eval_every is not None and self.step % cfg.eval_every == 0) or (
                    cfg.eval_every is None and epoch_end)
                due_save = epoch_end or last or (cfg.save_every is not None and self.step % cfg.save_every == 0)
                if due_eval or due_save or last or self.step % self._sync_every == 0:
                    self._sync()
                for h in self.hooks:
                    h.on_step_end(self)
                progress.update(self.step, self._bar_text if progress.tty else self._progress_text)
                if epoch_end:
                    for h in self.hooks:
                        h.on_epoch_end(self, (self.step - 1) // self.steps_per_epoch)
                if due_eval and not last:
                    progress.pause()
                    self.evaluate(epoch=self.step / self.steps_per_epoch, train_loss=self._take_train_loss())
                    progress.resume()
                stopping = D.any_rank(stop.requested, self.env) if (self.env.distributed or stop.requested) else False
                if stopping:
                    self._sync()
                if due_save or stopping:
                    self.save_state()
                if stopping:
                    progress.pause()
                    where = self.outputs.state if self.outputs is not None else "memory"
                    self.log(f"stopped by {stop.signal_name or 'a signal'} after step {self.step}/{self.total_steps}; "
                             f"state saved to {where}")  # how to continue: the command says (finetune, run)
                    raise stop.stopped()
                if due_eval or due_save or self._sync_every == 1:
                    # Validation, saving and hooks are not training time (where the host is in step
                    # with the device: without syncs, the device's time in flight would be lost).
                    self._mark = time.perf_counter()
            self._sync()
        for h in self.hooks:
            h.on_train_end(self)
        final = self.evaluate(epoch=self.step / self.steps_per_epoch, train_loss=self._take_train_loss(), final=True)
        return TrainResult(model=self.model, steps=self.step, epochs_done=self.step / self.steps_per_epoch,
                           evals=self.evals, best=self.best, final=final, train_images=self.train_images,
                           train_seconds=self.train_seconds, resumed_from=self.resumed_from,
                           hook_summaries={h.name: h.summary() for h in self.hooks},
                           plans=[p for h in self.hooks for p in h.plans()], input_path=self.inputs.kind,
                           workers=self.workers,
                           teacher_gap=None if self.distillation is None else
                           {"before": self.gap_before, "after": final["teacher_gap"] if final else None})


def _better(row: Mapping[str, Any], best: Mapping[str, Any]) -> bool:
    """Higher top-1 where validated on labels, else a smaller teacher gap."""
    if "top1" in row:
        return bool(row["top1"] > best["top1"])
    return bool(row["teacher_gap"] < best["teacher_gap"])


def _compiled(module: nn.Module) -> Any:
    """`torch.compile(module)`; compilation itself happens at the first call (see `_train_step`)."""
    try:
        return torch.compile(module)
    except RuntimeError as exc:  # platforms torch.compile does not support say so here
        raise UserError(f"--compile: {str(exc).splitlines()[0]}; run without --compile") from None
