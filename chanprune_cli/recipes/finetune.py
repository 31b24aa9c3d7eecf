"""The `finetune` recipe: fine-tune a (pruned) checkpoint, optionally distilling from a teacher or
pruning while training (a schedule of train/schedules.py), and save the result as a chanprune file
(a whole pickled model: back into its own container, `checkpoint.save_model`).

`FinetuneOptions` holds what the command's options set; the training knobs themselves are a
`TrainConfig` (train/), which the options carry whole.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..checkpoint import refuse_nonfinite, save_model, tool_version
from ..checkpoint.chanprune_format import resolve_normalization, with_normalization, with_task_output
from ..measure import describe_outputs, logits_of, set_task_output, task_output_of
from ..data import check_labels, fit_classes, open_dataset, parse_classes, recorded_classes, with_classes
from ..engine.allocate import parse_min_keep
from ..errors import UserError
from ..measure import count_macs, count_params
from ..models import build_model, widened_spec
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
from ..train.schedules import make_schedule
from .steps import (
    FloatsArg,
    Shape,
    ShapeArg,
    check_json_report,
    load_model,
    model_out_path,
    parse_inputs,
    parse_output,
    resolve_input_shape,
    say,
    select_task_output,
)

Show = Callable[[str], None]


@dataclass
class FinetuneOptions:
    """Everything `finetune_checkpoint` does besides the checkpoint; names and defaults as the
    options of `chanprune finetune` (see its --help)."""

    data: str  # training data (any --data form)
    out: str | None  # the fine-tuned model's file (None: CKPT-STEM.finetuned.safetensors next to the
    # checkpoint, .pt for a whole pickled model); <out>.best, <out>.last and <out>.state.pt go beside it
    val_data: str | None = None
    train: TrainConfig = field(default_factory=TrainConfig)  # epochs, steps, lr, batch size, seed, ...
    # distillation
    teacher: str | None = None
    teacher_arch: str | None = None
    teacher_arch_kwargs: str | dict[str, Any] | None = None
    # pruning while training
    schedule: str = "none"  # none | asfp | sfp | cac | whitebox
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
    # the model and its inputs
    arch: str | None = None
    arch_kwargs: str | dict[str, Any] | None = None
    input_shape: ShapeArg | None = None
    trust_pickle: bool = False
    device: str = "auto"
    mean: FloatsArg | None = None
    std: FloatsArg | None = None
    classes: str | Sequence[str] | None = None  # the model's class names in output order (--classes)
    output: str | None = None  # which of the model's outputs is the task output (--output INDEX|KEY)
    # the run
    threads: int | None = None
    resume: bool = False
    keep_state: bool = False
    force: bool = False


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


def finetune_checkpoint(checkpoint: str, options: FinetuneOptions, *, show: Show | None = None,
                        json_report: str | None = None) -> FinetuneResult | None:
    """Fine-tune `checkpoint` as `options` say and save the result to `options.out`.

    The run's report lines (its plan, every validation; rich markup) go to `show` (default: a
    console on stderr), log lines to stderr. Resumable (`options.resume`) and distributed under torchrun,
    where only rank 0 writes and gets a result (the others get None). `json_report` is where the
    caller will write the JSON report: checked before the slow steps."""
    o = options
    defaulted = o.out is None
    if defaulted:  # as prune names its output, so `finetune CKPT --data D` needs no --out; the suffix
        # follows the model once it is loaded, the state file beside it does not depend on it
        o = dataclasses.replace(o, out=str(Path(checkpoint).with_name(Path(checkpoint).stem + ".finetuned.safetensors")))
    if o.dcph and o.schedule != "cac":
        raise UserError("--dcph belongs to --schedule cac (double the channels, prune half while training)")
    if o.mask_lambda < 0:
        raise UserError(f"--mask-lambda must be 0 or more, got {o.mask_lambda}")
    ratio = 0.5 if o.dcph and o.ratio is None and o.target_flops is None else o.ratio
    if o.teacher_arch_kwargs is not None and o.teacher_arch is None:
        raise UserError("--teacher-arch-kwargs needs --teacher-arch")
    shape, mean, std = parse_inputs(o.input_shape, o.mean, o.std)
    choice = parse_output(o.output)
    if o.classes is not None:
        o = dataclasses.replace(o, classes=parse_classes(o.classes))
    check_json_report(json_report, o.force)
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
        return _run(checkpoint, o, ratio, shape, mean, std, choice, paths, defaulted, show)


def _run(checkpoint: str, o: FinetuneOptions, ratio: float | None, shape: Shape | None, mean: tuple[float, ...] | None,
         std: tuple[float, ...] | None, choice: str | None, paths: OutputPaths, defaulted: bool,
         show: Show | None) -> FinetuneResult | None:
    cfg = o.train
    if o.min_keep is not None:
        parse_min_keep(o.min_keep)
    with D.distributed_session(resolve_device(o.device)) as (env, device):
        show_main = (show or make_console(stderr=True).print) if env.is_main else (lambda text: None)

        loaded = load_model(checkpoint, o.arch, o.arch_kwargs, o.trust_pickle)
        paths = OutputPaths.for_out(model_out_path(None if defaulted else o.out, checkpoint, "finetuned", loaded))
        if defaulted:
            check_output(paths.out, o.force)
        spec = loaded.arch
        shape = resolve_input_shape(shape, loaded, o.data)
        mean, std = resolve_normalization(loaded.meta, mean, std)  # a flag wins over what the checkpoint records
        task_output = select_task_output(loaded, choice, shape)
        if not o.dcph:  # DCPH trains a new, wider model: the checkpoint's weights are not used
            refuse_nonfinite(loaded.model, "fine-tune")
        model = loaded.model
        history, plans = list(loaded.history), list(loaded.plans)
        if o.dcph:
            if loaded.plans:
                raise UserError("--dcph starts from an unpruned built-in architecture; this checkpoint is already pruned")
            if loaded.arch is None:
                raise UserError("--dcph builds the model's architecture at twice its width; this pickled model records "
                                "none: pass --arch to name it")
            spec = widened_spec(loaded.arch, 2.0)
            torch.manual_seed(cfg.seed)
            model = build_model(spec)
            set_task_output(model, task_output)
            history = [{"command": "finetune", "dcph": True, "from": str(checkpoint), "arch": loaded.arch.to_json(),
                        "note": "2x-wide architecture trained from initialisation (weights of the checkpoint unused)"}]
            plans = []
        state = None
        if o.resume:
            state = load_train_state(paths.state)
            if state.get("arch") != (spec.to_json() if spec is not None else None):
                raise UserError(f"the state at {paths.state} belongs to architecture {state.get('arch')}, not "
                                f"{spec or 'this pickled model'}; resume with the checkpoint the run started from")
            model = model_from_state(state, model if spec is None else None)  # a pickled model: restored in place
            set_task_output(model, task_output)

        classes = _num_classes(model, shape)  # before the data: a model that is no classifier fails first
        train_set = open_dataset(o.data, input_shape=shape, mean=mean, std=std, train=cfg.augment)
        val_set = open_dataset(o.val_data, input_shape=shape, mean=mean, std=std, train=False) if o.val_data else None
        for dataset in (train_set, val_set) if val_set is not None else (train_set,):
            fit_classes(dataset, classes, o.classes, recorded=recorded_classes(loaded.meta))
            check_labels(dataset, classes)
        # The class names the model was trained with, so that later commands match data to them.
        meta = with_classes(loaded.meta, train_set.classes) if train_set.num_classes == classes else loaded.meta
        meta = with_task_output(with_normalization(meta, mean, std), task_output)

        teacher_model = None
        if o.teacher is not None:
            t_loaded = load_model(o.teacher, o.teacher_arch or loaded.arch, o.teacher_arch_kwargs, o.trust_pickle)
            select_task_output(t_loaded, choice, shape)  # --output, else the teacher's recorded one
            if _num_classes(t_loaded.model, shape) != classes:
                raise UserError(f"the teacher outputs {_num_classes(t_loaded.model, shape)} classes, the student {classes}")
            refuse_nonfinite(t_loaded.model, "distil from")
            teacher_model = t_loaded.model

        hook = make_schedule(o.schedule, input_shape=shape, ratio=ratio, target_flops=o.target_flops,
                             interval=o.prune_every, until=o.prune_until, min_keep=o.min_keep, round_to=o.round_to,
                             ignore=list(o.ignore), seed=cfg.seed, drop_prob=o.drop_prob, rounds=o.cac_rounds,
                             lam=o.mask_lambda)
        before = {"params": count_params(model), "macs": count_macs(copy.deepcopy(model).eval(), shape)}
        requested = {"ratio": ratio, "target_flops": o.target_flops} if hook is not None else None
        entry = {"command": "finetune", "data": o.data, "val_data": o.val_data, "schedule": o.schedule,
                 "requested": requested, "teacher": o.teacher,
                 "kd": {"alpha": cfg.kd_alpha, "temperature": cfg.kd_temperature} if o.teacher else None,
                 "config": cfg.result_fields(), "world_size": env.world_size, "device": str(device),
                 "dcph": o.dcph or None}
        info = CheckpointInfo(arch=spec, input_shape=shape, history=history, plans=plans, meta=meta, entry=entry,
                              origin=loaded.origin)

        def on_eval(row: dict[str, Any]) -> None:
            mark = "  [green]best[/green]" if row["best"] else ""
            loss = f"{row['train_loss']:.4f}" if row.get("train_loss") is not None else "-"
            show_main(f"epoch {row['epoch']:.2f}  step {row['step']}  train loss {loss}  "
                      f"val top-1 {row['top1']:.2f} %  top-5 {row['top5']:.2f} %  val loss {row['loss']:.4f}{mark}")

        def log(text: str) -> None:
            if env.is_main:
                say(text)

        trainer = Trainer(model, train_set, cfg, device=device, val_set=val_set, teacher=teacher_model,
                          hooks=[hook] if hook is not None else [], env=env, outputs=paths, ckpt=info, log=log,
                          on_eval=on_eval)
        if state is not None:
            trainer.restore(state)
        where = f"{env.world_size} processes ({env.backend})" if env.distributed else str(device)
        show_main(f"[bold]finetune[/bold] {checkpoint} → {paths.out}")
        described = spec or f"{type(model).__name__} (pickled)"
        show_main(f"  model {described}  params {before['params']:,}  MACs {before['macs']:,}  on {where}")
        show_main(f"  {trainer.total_steps} steps ({trainer.total_steps / trainer.steps_per_epoch:.2f} epochs of "
                  f"{trainer.steps_per_epoch}), global batch {cfg.batch_size}, lr {cfg.lr:g} (warm-up + cosine), "
                  f"schedule {o.schedule}" + (f", teacher {o.teacher}" if o.teacher else "")
                  + (f"; resuming at step {trainer.step}" if state is not None else ""))
        inputs = {"tensor": "images held as one tensor on the device, cropped and flipped there",
                  "device-decode": "JPEG files decoded, cropped, resized and flipped on the device per step",
                  }.get(trainer.inputs.kind, "decoded and augmented per step")
        show_main(f"  input: {inputs}; {trainer.workers} loader worker(s)" + (", torch.compile" if cfg.compile else ""))

        result = trainer.fit()
        model = result.model
        after = {"params": count_params(model), "macs": count_macs(copy.deepcopy(model).cpu().eval(), shape)}
        final_entry = {**entry, "steps": result.steps, "validation": result.final, "best": result.best,
                       "before": before, "after": after, "schedules": result.hook_summaries,
                       "train_images_per_second": result.images_per_second, "tool_version": tool_version()}
        if env.is_main:
            save_model(paths.out, model, dataclasses.replace(loaded, arch=spec), input_shape=shape,
                       history=[*history, final_entry], plans=[*plans, *result.plans], meta=meta, force=True)
            if not o.keep_state:
                for p in (paths.state, paths.last):
                    p.unlink(missing_ok=True)
        D.barrier(env)
        if not env.is_main:
            return None
        return FinetuneResult(checkpoint, paths, o.schedule, requested, o.teacher, cfg, env.world_size, str(device),
                              val_set is not None, before, after, result)


def _num_classes(model: nn.Module, shape: Shape) -> int:
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            output = model(torch.zeros(2, *shape))
    finally:
        model.train(was)
    # A detector (e.g. YOLO) or a dense model has no (batch, classes) output: cross-entropy on labelled
    # images cannot train it, whichever output --output picks.
    if task_output_of(model) is None and not any(t.dim() == 2 for t in _tensors(output)):
        _not_a_classifier(describe_outputs(output))
    out = logits_of(output, model)
    if out.dim() != 2:
        _not_a_classifier(f"task output {describe_outputs(out)}")
    return int(out.shape[1])


def _tensors(output: Any) -> list[torch.Tensor]:
    if isinstance(output, torch.Tensor):
        return [output]
    values = output.values() if isinstance(output, dict) else output if isinstance(output, (tuple, list)) else []
    return [t for v in values for t in _tensors(v)]


def _not_a_classifier(what: str) -> None:
    raise UserError(f"finetune trains classifiers (cross-entropy on labelled images) but this model returns {what}, "
                    "no (batch, classes) logits; use the model's own training code to fine-tune a detector or other "
                    "model (see the README, 'Whole pickled models')")
