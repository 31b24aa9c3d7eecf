"""The `finetune` recipe: fine-tune a (pruned) checkpoint, optionally distilling from a teacher or
pruning while training (a schedule of train/schedules/), and save the result as a chanprune file
(a whole pickled model: back into its own container, `checkpoint.save_model`).

With a teacher, a model without class logits (a detector, a segmenter, YOLO, a model with several
outputs), or a classifier given images without labels (a folder of images without class folders),
is distilled without labels (`train.distill`): the loss is the teacher's outputs alone, and the
teacher gap is measured on held-out images (--val-data, else a part of --data set aside).

`FinetuneOptions` holds what the command's options set: the model (`ModelOptions`), the training
knobs (a `train.TrainConfig`), the teacher and the pruning schedule (`ScheduleOptions`).
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, NoReturn

import torch
from torch import nn
from torch.utils.data import Subset

from ..checkpoint import refuse_nonfinite, save_model, tool_version
from ..checkpoint.chanprune_format import with_normalization, with_task_output
from ..data import check_labels, fit_classes, open_dataset, recorded_classes, with_classes
from ..engine.allocate import parse_min_keep
from ..errors import UserError
from ..measure import count_macs, count_params, describe_outputs, logits_of, set_task_output, task_output_of
from ..models import ArchSpec, build_model, widened_spec
from ..support import distributed as D
from ..support.console import make_console
from ..support.device import resolve_device
from ..support.fsutil import check_output
from ..train import (
    CheckpointInfo,
    OutputPaths,
    TrainConfig,
    Trainer,
    TrainResult,
    load_train_state,
    model_from_state,
    threads,
)
from ..train.distill import Distillation
from ..train.losses import TaskLoss, choose_loss
from ..train.schedules import make_schedule
from .opening import ModelOptions, OpenedModel, Shape, default_out_path, load_model, model_out_path, open_model, select_task_output
from .steps import check_json_report, recipe_entry, say, warn

__all__ = ["FinetuneOptions", "FinetuneResult", "ScheduleOptions", "TrainConfig", "finetune_checkpoint"]

Show = Callable[[str], None]


@dataclass(frozen=True)
class ScheduleOptions:
    """Pruning while training (`--schedule`, train/schedules/); names and defaults as the options
    of `chanprune finetune` (see its --help). `name`: none | asfp | sfp | cac | whitebox; exactly one
    target, `ratio` or `target_flops` (`dcph` without one: ratio 0.5); `min_keep` None: the
    schedule's own default."""

    name: str = "none"
    ratio: float | None = None
    target_flops: float | None = None
    prune_every: int | None = None
    prune_until: float | None = None
    cac_rounds: int = 4
    drop_prob: float = 0.1
    dcph: bool = False
    mask_lambda: float = 5e-3
    min_keep: float | None = None
    round_to: int = 1
    ignore: Sequence[str] = ()

    def __post_init__(self) -> None:
        if self.dcph and self.name != "cac":
            raise UserError("--dcph belongs to --schedule cac (double the channels, prune half while training)")
        if self.mask_lambda < 0:
            raise UserError(f"--mask-lambda must be 0 or more, got {self.mask_lambda}")
        if self.dcph and self.ratio is None and self.target_flops is None:
            object.__setattr__(self, "ratio", 0.5)
        if self.min_keep is not None:
            parse_min_keep(self.min_keep)
        object.__setattr__(self, "ignore", tuple(self.ignore))


@dataclass(frozen=True)
class FinetuneOptions:
    """Everything `finetune_checkpoint` does besides the checkpoint; names and defaults as the
    options of `chanprune finetune` (see its --help). `json_report`: where the caller will write
    the JSON report, checked before the slow steps."""

    data: str  # training data (any --data form)
    out: str | None = None  # the fine-tuned model's file (None: CKPT-STEM.finetuned.safetensors in the working
    # directory, .pt for a whole pickled model); <out>.best, <out>.last and <out>.state.pt go beside it
    val_data: str | None = None
    train: TrainConfig = field(default_factory=TrainConfig)  # epochs, steps, lr, batch size, seed, ...
    # distillation
    teacher: str | None = None
    teacher_arch: str | None = None
    teacher_arch_kwargs: str | dict[str, Any] | None = None
    distil_features: Sequence[str] = ()  # label-free distillation: module globs whose outputs are matched too
    schedule: ScheduleOptions = field(default_factory=ScheduleOptions)
    model: ModelOptions = field(default_factory=ModelOptions)
    # the run
    threads: int | None = None
    resume: bool = False
    keep_state: bool = False
    force: bool = False
    json_report: str | None = None

    def __post_init__(self) -> None:
        self.train.check()
        if self.teacher_arch_kwargs is not None and self.teacher_arch is None:
            raise UserError("--teacher-arch-kwargs needs --teacher-arch")
        object.__setattr__(self, "distil_features", tuple(self.distil_features))
        if self.distil_features and self.teacher is None:
            raise UserError("--distil-features matches a teacher's features: give --teacher")


@dataclass
class FinetuneResult:
    """What `finetune_checkpoint` did; `train` has the steps, evaluations and the model."""

    checkpoint: str
    paths: OutputPaths  # out (written), best (written when validated), last/state (removed unless keep_state)
    schedule: str
    requested: dict[str, float | None] | None  # the schedule's target (None without a schedule)
    teacher: str | None
    config: TrainConfig
    world_size: int
    device: str
    validated: bool  # whether val_data was given
    before: dict[str, int]  # params, macs
    after: dict[str, int]
    train: TrainResult
    distillation: dict[str, Any] | None = None  # label-free: what was matched, the held-out images
    loss: TaskLoss | None = None  # on labels: the task loss and why (None in label-free distillation)
    warnings: list[str] = field(default_factory=list)  # e.g. a run that ended far below its best validation


@recipe_entry
def finetune_checkpoint(checkpoint: str, options: FinetuneOptions, *, show: Show | None = None) -> FinetuneResult | None:
    """Fine-tune `checkpoint` as `options` say and save the result to `options.out`.

    The run's report lines (its plan, every validation; rich markup) go to `show` (default: a
    console on stderr), log lines to stderr. Resumable (`options.resume`) and distributed under torchrun,
    where only rank 0 writes and gets a result (the others get None)."""
    o = options
    defaulted = o.out is None
    if defaulted:  # as prune names its output, so `finetune CKPT --data D` needs no --out; the suffix
        # follows the model once it is loaded, the state file beside it does not depend on it
        o = dataclasses.replace(o, out=default_out_path(checkpoint, "finetuned"))
    assert o.out is not None
    check_json_report(o.json_report, o.force)
    o.train.check()
    paths = OutputPaths.for_out(o.out)
    if not defaulted:
        check_output(o.out, o.force)
    if o.resume and not paths.state.exists():
        raise UserError(f"--resume: no training state at {paths.state} (nothing was interrupted, or the run completed)")
    if not o.resume and paths.state.exists() and not o.force:
        raise UserError(f"a run state from an earlier run exists at {paths.state}: pass --resume to continue it, "
                        "or --force to start over")
    with threads(o.threads):
        return _run(checkpoint, o, defaulted, show)


@dataclass
class _Student:
    """The model to train and what its file records: the checkpoint's, or (--dcph) a twice-wide
    model from initialisation; restored from the training state with --resume."""

    model: nn.Module
    spec: ArchSpec | None
    history: list[dict[str, Any]]
    plans: list[dict[str, Any]]
    state: dict[str, Any] | None


def _run(checkpoint: str, o: FinetuneOptions, defaulted: bool, show: Show | None) -> FinetuneResult | None:
    cfg = o.train
    with D.distributed_session(resolve_device(o.model.device)) as (env, device):
        show_main = (show or make_console(stderr=True).print) if env.is_main else (lambda text: None)

        # DCPH trains a new, wider model: the checkpoint's weights are not used
        opened = open_model(checkpoint, o.model, data=o.data, refuse=None if o.schedule.dcph else "fine-tune")
        paths = OutputPaths.for_out(model_out_path(None if defaulted else o.out, checkpoint, "finetuned", opened.loaded))
        if defaulted:
            check_output(paths.out, o.force)
        shape = opened.input_shape
        student = _student(checkpoint, opened, o, paths)
        # before the data: a model that is no classifier fails first, unless a teacher can distil it
        classes = _num_classes(student.model, shape, required=o.teacher is None)
        train_set = open_dataset(o.data, input_shape=shape, mean=opened.mean, std=opened.std, train=cfg.augment,
                                 unlabelled=o.teacher is not None)
        label_free = o.teacher is not None and (classes is None or train_set.num_classes == 0)
        teacher = _teacher(o, opened, classes)
        data: _DistillationData | None = None
        distillation: Distillation | None = None
        task_loss: TaskLoss | None = None
        if label_free:
            assert teacher is not None
            data = _distillation_data(o, opened, classes, train_set)
            val_set, meta = data.val_set, data.meta
            distillation = Distillation(logits=classes is not None, temperature=cfg.kd_temperature,
                                        output=o.model.output, features=o.distil_features, held_out=data.held_out)
            distillation.prepare(student.model, teacher, torch.zeros(2, *shape), seed=cfg.seed)
        else:
            assert classes is not None
            val_set, meta = _labelled_data(o, opened, classes, train_set)
            task_loss = _task_loss(o, student.model, train_set, teacher)
        s = o.schedule
        hook = make_schedule(s.name, input_shape=shape, ratio=s.ratio, target_flops=s.target_flops,
                             interval=s.prune_every, until=s.prune_until, min_keep=s.min_keep, round_to=s.round_to,
                             ignore=list(s.ignore), seed=cfg.seed, drop_prob=s.drop_prob, rounds=s.cac_rounds,
                             lam=s.mask_lambda)
        before = {"params": count_params(student.model), "macs": count_macs(copy.deepcopy(student.model).eval(), shape)}
        requested = {"ratio": s.ratio, "target_flops": s.target_flops} if hook is not None else None
        entry = {"command": "finetune", "data": o.data, "val_data": o.val_data, "schedule": s.name,
                 "requested": requested, "teacher": o.teacher,
                 "kd": {"alpha": cfg.kd_alpha, "temperature": cfg.kd_temperature} if o.teacher else None,
                 "config": cfg.result_fields(), "world_size": env.world_size, "device": str(device),
                 "dcph": s.dcph or None}
        distilled = None if data is None or distillation is None else {
            **distillation.describe(), "held_out": data.held_out_from,
            "held_out_images": min(len(data.held_out), cfg.val_images or len(data.held_out))}  # --val-images caps them
        if distilled is not None:
            entry = {**entry, "kd": None, "distillation": distilled}
        info = CheckpointInfo(arch=student.spec, input_shape=shape, history=student.history, plans=student.plans,
                              meta=meta, entry=entry, origin=opened.loaded.origin)

        def on_eval(row: dict[str, Any]) -> None:
            mark = "  [green]best[/green]" if row["best"] else ""
            loss = f"{row['train_loss']:.4f}" if row.get("train_loss") is not None else "-"
            val = (f"  val top-1 {row['top1']:.2f} %  top-5 {row['top5']:.2f} %  val loss {row['loss']:.4f}"
                   if "top1" in row else "")
            gap = f"  teacher gap {row['teacher_gap']:.4f}" if "teacher_gap" in row else ""
            show_main(f"epoch {row['epoch']:.2f}  step {row['step']}  train loss {loss}{val}{gap}{mark}")

        def log(text: str) -> None:
            if env.is_main:
                say(text)

        trainer = Trainer(student.model, train_set, cfg, device=device, val_set=val_set, teacher=teacher,
                          hooks=[hook] if hook is not None else [], env=env, outputs=paths, ckpt=info, log=log,
                          on_eval=on_eval, distillation=distillation,
                          train_indices=data.train_indices if data is not None else None, task_loss=task_loss)
        if student.state is not None:
            trainer.restore(student.state)
        where = f"{env.world_size} processes ({env.backend})" if env.distributed else str(device)
        _announce(show_main, trainer, f"{checkpoint} → {paths.out}", student, before, where, o)

        result = trainer.fit()
        fell = _fell_far_below(result.evals, s.name)
        if fell is not None and env.is_main:
            warn(fell)
        model = result.model
        after = {"params": count_params(model), "macs": count_macs(copy.deepcopy(model).cpu().eval(), shape)}
        final_entry = {**entry, "steps": result.steps, "validation": result.final, "best": result.best,
                       "before": before, "after": after, "schedules": result.hook_summaries,
                       "train_images_per_second": result.images_per_second, "tool_version": tool_version()}
        if result.teacher_gap is not None:
            final_entry["teacher_gap"] = result.teacher_gap
        if env.is_main:
            save_model(paths.out, model, dataclasses.replace(opened.loaded, arch=student.spec), input_shape=shape,
                       history=[*student.history, final_entry], plans=[*student.plans, *result.plans], meta=meta,
                       force=True)
            if not o.keep_state:
                for p in (paths.state, paths.last):
                    p.unlink(missing_ok=True)
        D.barrier(env)
        if not env.is_main:
            return None
        return FinetuneResult(checkpoint, paths, s.name, requested, o.teacher, cfg, env.world_size, str(device),
                              val_set is not None, before, after, result, distilled, loss=task_loss)


def _task_loss(o: FinetuneOptions, model: nn.Module, train_set: Any, teacher: nn.Module | None) -> TaskLoss:
    """The loss on labels (`--loss`; `auto`: from the model's outputs on a few training samples, as
    they are, not augmented), said in one line when it is not cross-entropy on logits."""
    samples = copy.copy(train_set)
    samples.train = False  # unaugmented, and the training set's random draws left as they are
    x = torch.stack([samples[i][0] for i in range(min(16, len(samples)))])
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            chosen = choose_loss(o.train.loss, logits_of(model(x), model))
    finally:
        model.train(was)
    if teacher is not None and o.train.kd_alpha > 0 and (chosen.name != "ce" or chosen.probabilities):
        raise UserError(f"--teacher on labelled data adds the teacher's logits by KL divergence, which needs --loss ce "
                        f"on logits, but the loss is {chosen.name} ({chosen.why}); pass --kd-alpha 0, or drop --teacher")
    if (chosen.name != "ce" or chosen.probabilities) and D.current().is_main:
        say(f"loss: {chosen.name}{' on probabilities' if chosen.probabilities else ''}, because {chosen.why}"
            + ("; --loss ce|bce|mse to choose" if chosen.why != "--loss" else ""))
    return chosen


def _fell_far_below(evals: Sequence[dict[str, Any]], schedule: str) -> str | None:
    """The warning for a run whose last validation is far below its best one (by 10 points and a
    quarter of it): too short for a schedule to recover from its removals, or diverged."""
    rows = [row for row in evals if row.get("top1") is not None]
    if len(rows) < 2:
        return None
    best, last = max(rows, key=lambda row: row["top1"]), rows[-1]
    if last["top1"] >= min(best["top1"] - 10.0, 0.75 * best["top1"]):
        return None
    why = ("the run may be too short to recover from the schedule's removals (more epochs, or --prune-until below 1 "
           "to fine-tune after them)" if schedule != "none" else "the run may have diverged (a lower --lr)")
    return (f"top-1 ended at {last['top1']:.2f} %, far below the {best['top1']:.2f} % validated at epoch "
            f"{best['epoch']:g}: {why}")


def _student(checkpoint: str, opened: OpenedModel, o: FinetuneOptions, paths: OutputPaths) -> _Student:
    loaded = opened.loaded
    model, spec = loaded.model, loaded.arch
    history, plans = list(loaded.history), list(loaded.plans)
    if o.schedule.dcph:
        if loaded.plans:
            raise UserError("--dcph starts from an unpruned built-in architecture; this checkpoint is already pruned")
        if loaded.arch is None:
            raise UserError("--dcph builds the model's architecture at twice its width; this pickled model records "
                            "none: pass --arch to name it")
        spec = widened_spec(loaded.arch, 2.0)
        torch.manual_seed(o.train.seed)
        model = build_model(spec)
        set_task_output(model, opened.task_output)
        history = [{"command": "finetune", "dcph": True, "from": str(checkpoint), "arch": loaded.arch.to_json(),
                    "note": "2x-wide architecture trained from initialisation (weights of the checkpoint unused)"}]
        plans = []
    if not any(p.requires_grad for p in model.parameters()):
        model.requires_grad_(True)  # saved for inference with every weight frozen (ultralytics' final checkpoints)
    state = None
    if o.resume:
        state = load_train_state(paths.state)
        if state.get("arch") != (spec.to_json() if spec is not None else None):
            raise UserError(f"the state at {paths.state} belongs to architecture {state.get('arch')}, not "
                            f"{spec or 'this pickled model'}; resume with the checkpoint the run started from")
        model = model_from_state(state, model if spec is None else None)  # a pickled model: restored in place
        set_task_output(model, opened.task_output)
    return _Student(model, spec, history, plans, state)


def _labelled_data(o: FinetuneOptions, opened: OpenedModel, classes: int, train_set: Any) -> tuple[Any, dict[str, Any]]:
    """The validation set, and the training and validation sets' labels checked against the
    model's outputs; the metadata the result records (the class names it was trained with, so
    that later commands match data to them; the normalisation and task output)."""
    shape, mean, std = opened.input_shape, opened.mean, opened.std
    val_set = open_dataset(o.val_data, input_shape=shape, mean=mean, std=std, train=False) if o.val_data else None
    for dataset in (train_set, val_set) if val_set is not None else (train_set,):
        fit_classes(dataset, classes, opened.classes, recorded=recorded_classes(opened.loaded.meta))
        check_labels(dataset, classes)
    meta = with_classes(opened.loaded.meta, train_set.classes) if train_set.num_classes == classes else opened.loaded.meta
    return val_set, with_task_output(with_normalization(meta, mean, std), opened.task_output)


_HELD_OUT_MAX = 256  # images set aside from --data for the teacher gap when there is no --val-data


@dataclass
class _DistillationData:
    """What label-free distillation reads besides its training images: the held-out images of the
    teacher gap (`held_out_from`: "val-data", or "data" for a part of --data the run does not
    train on, `train_indices` the rest), labelled validation data for a classifier's top-1."""

    held_out: Any
    held_out_from: str
    train_indices: list[int] | None
    val_set: Any
    meta: dict[str, Any]


def _distillation_data(o: FinetuneOptions, opened: OpenedModel, classes: int | None, train_set: Any) -> _DistillationData:
    shape, mean, std = opened.input_shape, opened.mean, opened.std
    meta = with_task_output(with_normalization(opened.loaded.meta, mean, std), opened.task_output)
    if o.val_data:
        held_out = open_dataset(o.val_data, input_shape=shape, mean=mean, std=std, train=False, unlabelled=True)
        val_set = None
        if classes is not None and held_out.num_classes:  # a classifier's labelled validation: top-1 too
            fit_classes(held_out, classes, opened.classes, recorded=recorded_classes(opened.loaded.meta))
            check_labels(held_out, classes)
            val_set = held_out
        return _DistillationData(held_out, "val-data", None, val_set, meta)
    n = len(train_set)
    k = min(_HELD_OUT_MAX, max(1, n // 10))
    chosen = torch.randperm(n, generator=torch.Generator().manual_seed(o.train.seed))[:k]
    held = set(chosen.tolist())
    images = copy.copy(train_set)
    images.train = False  # the held-out images as they are, not augmented
    return _DistillationData(Subset(images, sorted(held)), "data", [i for i in range(n) if i not in held], None, meta)


def _teacher(o: FinetuneOptions, opened: OpenedModel, classes: int | None) -> nn.Module | None:
    """The --teacher model (its architecture: --teacher-arch, else the student's base one)."""
    if o.teacher is None:
        return None
    options = ModelOptions(arch=o.teacher_arch or opened.loaded.arch, arch_kwargs=o.teacher_arch_kwargs,
                           trust_pickle=o.model.trust_pickle)
    loaded = load_model(o.teacher, options)
    select_task_output(loaded, o.model.output, opened.input_shape)  # --output, else the teacher's recorded one
    theirs = _num_classes(loaded.model, opened.input_shape, required=False)
    if classes is not None and theirs != classes:  # other models: their outputs are matched leaf by leaf
        raise UserError(f"the teacher outputs {theirs} classes, the student {classes}")
    refuse_nonfinite(loaded.model, "distil from")
    return loaded.model


def _announce(show: Show, trainer: Trainer, what: str, student: _Student, before: dict[str, int], where: str,
              o: FinetuneOptions) -> None:
    """The run's plan, before the first step."""
    cfg = o.train
    show(f"[bold]finetune[/bold] {what}")
    described = student.spec or f"{type(student.model).__name__} (pickled)"
    show(f"  model {described}  params {before['params']:,}  MACs {before['macs']:,}  on {where}")
    show(f"  {trainer.total_steps} steps ({trainer.total_steps / trainer.steps_per_epoch:.2f} epochs of "
         f"{trainer.steps_per_epoch}), global batch {cfg.batch_size}, lr {cfg.lr:g} (warm-up + cosine), "
         f"schedule {o.schedule.name}" + (f", teacher {o.teacher}" if o.teacher else "")
         + (f"; resuming at step {trainer.step}" if student.state is not None else ""))
    inputs = {"tensor": "images held as one tensor on the device, cropped and flipped there",
              "device-decode": "JPEG files decoded, cropped, resized and flipped on the device per step",
              }.get(trainer.inputs.kind, "decoded and augmented per step")
    show(f"  input: {inputs}; {trainer.workers} loader worker(s)" + (", torch.compile" if cfg.compile else ""))


def _num_classes(model: nn.Module, shape: Shape, *, required: bool) -> int | None:
    """The number of class logits of the model's task output. None when it has none (a detector,
    e.g. YOLO, or a dense model: no (batch, classes) output; several outputs and no --output),
    unless `required` (training on labels), which then raises a UserError saying how to recover it."""
    output = _forward(model, shape)
    if task_output_of(model) is None and not any(t.dim() == 2 for t in _tensors(output)):
        return None if not required else _not_a_classifier(describe_outputs(output))
    try:
        out = logits_of(output, model)
    except UserError:
        if required:
            raise
        return None
    if out.dim() != 2:
        return None if not required else _not_a_classifier(f"task output {describe_outputs(out)}")
    return int(out.shape[1])


def _forward(model: nn.Module, shape: Shape) -> Any:
    """The model's output for two zero images, in eval mode."""
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            return model(torch.zeros(2, *shape))
    finally:
        model.train(was)


def _tensors(output: Any) -> list[torch.Tensor]:
    if isinstance(output, torch.Tensor):
        return [output]
    values = output.values() if isinstance(output, dict) else output if isinstance(output, (tuple, list)) else []
    return [t for v in values for t in _tensors(v)]


def _not_a_classifier(what: str) -> NoReturn:
    raise UserError(f"finetune trains classifiers on labelled images, but this model returns {what}, no (batch, classes) "
                    "logits; recover it without labels by distilling it from the model it was pruned from: --teacher "
                    "ORIGINAL (--data: any images of its task, a folder without class folders will do)")
