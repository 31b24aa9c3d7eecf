"""`chanprune finetune`: fine-tune a (pruned) model, optionally pruning during training (train.py)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any, Optional

import typer

from ..errors import UserError
from .common import (
    DATA_PANEL,
    OUTPUT_PANEL,
    ArchKwargsOpt,
    ArchOpt,
    BatchSizeOpt,
    CkptArg,
    ConfigOpt,
    DataOpt,
    DebugOpt,
    DeviceOpt,
    ForceOpt,
    InputShapeOpt,
    JsonOpt,
    MeanOpt,
    OutOpt,
    SeedOpt,
    StdOpt,
    TrustPickleOpt,
    WorkersOpt,
    app,
    examples,
    load_model,
    prefer_flags,
    refuse_nonfinite,
    resolve_input_shape,
    validate_common,
)

if TYPE_CHECKING:
    from rich.console import Console

TRAIN_PANEL = "Training"
KD_PANEL = "Distillation"
SCHEDULE_PANEL = "Pruning schedule"
RUN_PANEL = "Runtime"


@app.command(
    epilog=examples(
        ("fine-tune a pruned CIFAR ResNet for 30 epochs, validating every epoch",
         "chanprune finetune r56-half.safetensors --data cifar10-train.tar.gz --val-data cifar10-test.tar.gz "
         "--epochs 30 --lr 0.05 --mean 0.485,0.456,0.406 --std 0.229,0.224,0.225 --out r56-ft.safetensors"),
        ("a quick bounded run (CI), distilling from the unpruned model",
         "chanprune finetune pruned.safetensors --data train/ --max-steps 200 --teacher resnet56.th --out ft.safetensors"),
        ("asymptotic soft filter pruning of an unpruned model to half of its MACs",
         "chanprune finetune resnet56.th --arch cifar_resnet56 --data train.tar.gz --epochs 40 --schedule asfp "
         "--target-flops 0.5 --out r56-asfp.safetensors"),
        ("continue an interrupted run (same command line plus --resume)",
         "chanprune finetune r56-half.safetensors --data train.tar.gz --epochs 30 --out r56-ft.safetensors --resume"),
        ("4 GPUs on one node (global batch 512)",
         "torchrun --nproc-per-node 4 -m chanprune_cli finetune p.safetensors --data train/ --batch-size 512 --out ft.safetensors"),
    ),
)
def finetune(
    ckpt: CkptArg = None,
    data: DataOpt = None,
    val_data: Annotated[Optional[str], typer.Option("--val-data", metavar="VAL", help="Validation data (same forms as --data), evaluated every epoch (or --eval-every steps); the best model is kept as <out>.best.", rich_help_panel=DATA_PANEL, show_default=False)] = None,
    epochs: Annotated[Optional[int], typer.Option("--epochs", metavar="E", min=1, help="Passes over --data (default: 1, or as many as --max-steps needs).", rich_help_panel=TRAIN_PANEL, show_default=False)] = None,
    max_steps: Annotated[Optional[int], typer.Option("--max-steps", metavar="N", min=1, help="Stop after N optimizer steps; the lr schedule spans the bounded run (quick jobs, CI).", rich_help_panel=TRAIN_PANEL, show_default=False)] = None,
    lr: Annotated[float, typer.Option("--lr", metavar="LR", help="Peak learning rate (SGD).", rich_help_panel=TRAIN_PANEL)] = 0.01,
    momentum: Annotated[float, typer.Option("--momentum", help="SGD momentum.", rich_help_panel=TRAIN_PANEL)] = 0.9,
    nesterov: Annotated[bool, typer.Option("--nesterov/--no-nesterov", help="Nesterov momentum.", rich_help_panel=TRAIN_PANEL)] = True,
    weight_decay: Annotated[float, typer.Option("--weight-decay", metavar="WD", help="Weight decay of conv/linear weights.", rich_help_panel=TRAIN_PANEL)] = 5e-4,
    decay_norm_bias: Annotated[bool, typer.Option("--decay-norm-bias", help="Also decay norm parameters and biases (off by default).", rich_help_panel=TRAIN_PANEL)] = False,
    warmup: Annotated[float, typer.Option("--warmup", metavar="W", help="Linear warm-up: a fraction of the steps (<1) or a number of steps.", rich_help_panel=TRAIN_PANEL)] = 0.05,
    min_lr: Annotated[float, typer.Option("--min-lr", metavar="LR", help="The cosine decay ends at this learning rate.", rich_help_panel=TRAIN_PANEL)] = 0.0,
    label_smoothing: Annotated[float, typer.Option("--label-smoothing", metavar="S", help="Label smoothing of the cross-entropy (0: off).", rich_help_panel=TRAIN_PANEL)] = 0.0,
    grad_clip: Annotated[Optional[float], typer.Option("--grad-clip", metavar="NORM", help="Clip the global gradient norm.", rich_help_panel=TRAIN_PANEL, show_default=False)] = None,
    augment: Annotated[bool, typer.Option("--augment/--no-augment", help="Random crop (pad 4 at 32 px) + flip for small images, random-resized crop + flip for large ones (no flip for digits).", rich_help_panel=TRAIN_PANEL)] = True,
    teacher: Annotated[Optional[str], typer.Option("--teacher", metavar="CKPT", help="Distil from this model (usually the unpruned original): (1-α)·CE + α·T²·KL(teacher ‖ student) at temperature T.", rich_help_panel=KD_PANEL, show_default=False)] = None,
    teacher_arch: Annotated[Optional[str], typer.Option("--teacher-arch", metavar="ARCH", help="Architecture of a --teacher state dict (default: the student's base architecture).", rich_help_panel=KD_PANEL, show_default=False)] = None,
    teacher_arch_kwargs: Annotated[Optional[str], typer.Option("--teacher-arch-kwargs", metavar="JSON", help="Factory kwargs for --teacher-arch.", rich_help_panel=KD_PANEL, show_default=False)] = None,
    kd_alpha: Annotated[float, typer.Option("--kd-alpha", metavar="α", help="Weight of the distillation term.", rich_help_panel=KD_PANEL)] = 0.5,
    kd_temperature: Annotated[float, typer.Option("--kd-temperature", metavar="T", help="Softmax temperature of the distillation term.", rich_help_panel=KD_PANEL)] = 4.0,
    schedule: Annotated[str, typer.Option("--schedule", metavar="none|asfp|sfp|cac|whitebox", help="Prune while training: [b]asfp[/b] asymptotic soft filter pruning (rate P·(1−4^(−t/D)), filters re-selected every interval, removed at the end), [b]sfp[/b] the same at a constant rate, [b]cac[/b] online conditional-accuracy-change gates removing channels early in training (reconstructed), [b]whitebox[/b] class-wise masks trained on frozen weights, global-voting removal and BN rescaling, then fine-tuning.", rich_help_panel=SCHEDULE_PANEL)] = "none",
    ratio: Annotated[Optional[float], typer.Option("--ratio", metavar="R", help="Schedule target: remove this fraction of the channels of every prunable group.", rich_help_panel=SCHEDULE_PANEL, show_default=False)] = None,
    target_flops: Annotated[Optional[float], typer.Option("--target-flops", metavar="F", help="Schedule target: remove this fraction of the MACs (global ranking).", rich_help_panel=SCHEDULE_PANEL, show_default=False)] = None,
    prune_every: Annotated[Optional[int], typer.Option("--prune-every", metavar="STEPS", min=1, help="Pruning interval in steps (asfp/sfp default: one epoch; cac default: --cac-rounds equal intervals).", rich_help_panel=SCHEDULE_PANEL, show_default=False)] = None,
    prune_until: Annotated[Optional[float], typer.Option("--prune-until", metavar="FRAC", help="Pruning ends (physical removal) at this fraction of the run; the rest fine-tunes the smaller model (asfp/sfp default 1.0, cac 0.25, whitebox 0.2: its mask-training phase).", rich_help_panel=SCHEDULE_PANEL, show_default=False)] = None,
    cac_rounds: Annotated[int, typer.Option("--cac-rounds", metavar="N", min=1, help="cac: removal rounds (when --prune-every is not given).", rich_help_panel=SCHEDULE_PANEL)] = 4,
    drop_prob: Annotated[float, typer.Option("--drop-prob", metavar="P", help="cac: probability that a gate switches a channel off for a sample.", rich_help_panel=SCHEDULE_PANEL)] = 0.1,
    dcph: Annotated[bool, typer.Option("--dcph", help="cac: 'double channels, prune half': train the checkpoint's built-in architecture at 2× width from initialisation (its weights are not used) and prune half (--ratio 0.5 unless given).", rich_help_panel=SCHEDULE_PANEL)] = False,
    mask_lambda: Annotated[float, typer.Option("--mask-lambda", metavar="λ", help="whitebox: λ of the penalty λ·Σ over groups of ‖Σ over classes of M‖₂ on the class-wise masks M.", rich_help_panel=SCHEDULE_PANEL)] = 5e-3,
    min_keep: Annotated[Optional[float], typer.Option("--min-keep", metavar="X", help="Schedules: every layer keeps at least X of its channels, a fraction or a count (default 0.1; whitebox 0.3).", rich_help_panel=SCHEDULE_PANEL, show_default=False)] = None,
    round_to: Annotated[int, typer.Option("--round-to", metavar="N", min=1, help="Schedules: kept widths are multiples of N.", rich_help_panel=SCHEDULE_PANEL)] = 1,
    ignore: Annotated[Optional[list[str]], typer.Option("--ignore", metavar="GLOB", help="Schedules: never remove channels produced by modules matching GLOB (repeatable).", rich_help_panel=SCHEDULE_PANEL, show_default=False)] = None,
    amp: Annotated[str, typer.Option("--amp", metavar="auto|off|bf16|fp16", help="Mixed precision on CUDA (auto: bf16 where supported); CPU runs in float32.", rich_help_panel=RUN_PANEL)] = "auto",
    channels_last: Annotated[Optional[bool], typer.Option("--channels-last/--no-channels-last", help="Channels-last memory format (default: on CUDA).", rich_help_panel=RUN_PANEL, show_default=False)] = None,
    threads: Annotated[Optional[int], typer.Option("--threads", metavar="N", min=1, help="CPU threads for torch (tiny models train faster with 1).", rich_help_panel=RUN_PANEL, show_default=False)] = None,
    eval_every: Annotated[Optional[int], typer.Option("--eval-every", metavar="STEPS", min=1, help="Validate every STEPS steps instead of every epoch.", rich_help_panel=RUN_PANEL, show_default=False)] = None,
    eval_batch_size: Annotated[Optional[int], typer.Option("--eval-batch-size", metavar="B", min=1, help="Batch size of validation passes (default: max(batch, 128)).", rich_help_panel=RUN_PANEL, show_default=False)] = None,
    val_images: Annotated[Optional[int], typer.Option("--val-images", metavar="N", min=1, help="Validate on a fixed random subset of N images of --val-data (quick checks).", rich_help_panel=RUN_PANEL, show_default=False)] = None,
    save_every: Annotated[int, typer.Option("--save-every", metavar="STEPS", min=1, help="Save the resumable state every STEPS steps (and at every epoch end and on Ctrl-C / SIGTERM).", rich_help_panel=RUN_PANEL)] = 200,
    log_every: Annotated[int, typer.Option("--log-every", metavar="STEPS", min=1, help="Log line interval when stderr is not a terminal.", rich_help_panel=RUN_PANEL)] = 50,
    resume: Annotated[bool, typer.Option("--resume", help="Continue an interrupted run from <out>.state.pt (same options; same result as an uninterrupted run).", rich_help_panel=RUN_PANEL)] = False,
    keep_state: Annotated[bool, typer.Option("--keep-state", help="Keep <out>.last and <out>.state.pt after the run completes.", rich_help_panel=OUTPUT_PANEL)] = False,
    out: OutOpt = None,
    arch: ArchOpt = None,
    arch_kwargs: ArchKwargsOpt = None,
    input_shape: InputShapeOpt = None,
    trust_pickle: TrustPickleOpt = False,
    device: DeviceOpt = "auto",
    mean: MeanOpt = None,
    std: StdOpt = None,
    batch_size: BatchSizeOpt = 64,
    workers: WorkersOpt = 0,
    seed: SeedOpt = 0,
    json_out: JsonOpt = None,
    force: ForceOpt = False,
    config: ConfigOpt = None,
    debug: DebugOpt = False,
) -> None:
    """Fine-tune a model (SGD + warm-up/cosine, optional distillation), or prune it while training
    (asfp / sfp / cac / whitebox). Resumable, distributed under torchrun. --batch-size is the global batch."""
    if ckpt is None:
        raise UserError("give a checkpoint to fine-tune: chanprune finetune CKPT --data TRAIN --out F.safetensors")
    if data is None:
        raise UserError("give training data: --data (an ImageFolder, a .tar.gz of one, digits:train, synthetic:CxHxW:K:N ...)")
    if out is None:
        raise UserError("give an output file: --out finetuned.safetensors")
    if dcph and schedule != "cac":
        raise UserError("--dcph belongs to --schedule cac (double the channels, prune half while training)")
    if mask_lambda < 0:
        raise UserError(f"--mask-lambda must be 0 or more, got {mask_lambda}")
    ratio, target_flops = prefer_flags(ratio=ratio, target_flops=target_flops).values()
    if dcph and ratio is None and target_flops is None:
        ratio = 0.5
    if teacher_arch_kwargs is not None and teacher_arch is None:
        raise UserError("--teacher-arch-kwargs needs --teacher-arch")
    shape, mean_t, std_t = validate_common(input_shape, mean, std, json_out, force)

    from ..support.fsutil import check_output
    from ..train.schedules import make_schedule
    from ..train import OutputPaths, TrainConfig
    from ..train import threads as use_threads

    cfg = TrainConfig(epochs=epochs, max_steps=max_steps, batch_size=batch_size, lr=lr, momentum=momentum,
                      nesterov=nesterov, weight_decay=weight_decay, decay_norm_and_bias=decay_norm_bias,
                      warmup=warmup, min_lr=min_lr, label_smoothing=label_smoothing, kd_alpha=kd_alpha,
                      kd_temperature=kd_temperature, amp=amp, channels_last=channels_last, grad_clip=grad_clip,
                      seed=seed, augment=augment, workers=workers, eval_every=eval_every,
                      eval_batch_size=eval_batch_size, val_images=val_images, save_every=save_every,
                      log_every=log_every)
    cfg.check()
    paths = OutputPaths.for_out(out)
    check_output(out, force)
    if resume and not paths.state.exists():
        raise UserError(f"--resume: no training state at {paths.state} (nothing was interrupted, or the run completed)")
    if not resume and paths.state.exists() and not force:
        raise UserError(f"a run state from an earlier run exists at {paths.state}: pass --resume to continue it, "
                        "or --force to start over")
    with use_threads(threads):
        _run(ckpt=ckpt, data=data, val_data=val_data, cfg=cfg, paths=paths, teacher=teacher, teacher_arch=teacher_arch,
             teacher_arch_kwargs=teacher_arch_kwargs, schedule=schedule, ratio=ratio, target_flops=target_flops,
             prune_every=prune_every, prune_until=prune_until, cac_rounds=cac_rounds, drop_prob=drop_prob, dcph=dcph,
             mask_lambda=mask_lambda,
             min_keep=min_keep, round_to=round_to, ignore=ignore or [], arch=arch, arch_kwargs=arch_kwargs,
             shape=shape, trust_pickle=trust_pickle, device_name=device, mean=mean_t, std=std_t,
             resume=resume, keep_state=keep_state, json_out=json_out, make_schedule=make_schedule)


def _run(*, ckpt: str, data: str, val_data: str | None, cfg: Any, paths: Any, teacher: str | None,
         teacher_arch: str | None, teacher_arch_kwargs: str | None, schedule: str, ratio: float | None,
         target_flops: float | None, prune_every: int | None, prune_until: float | None, cac_rounds: int,
         drop_prob: float, dcph: bool, mask_lambda: float, min_keep: float | None, round_to: int, ignore: list[str],
         arch: str | None,
         arch_kwargs: str | None, shape: tuple[int, int, int] | None, trust_pickle: bool, device_name: str,
         mean: tuple[float, ...] | None, std: tuple[float, ...] | None, resume: bool, keep_state: bool,
         json_out: str | None, make_schedule: Any) -> None:
    import copy

    import torch

    from ..support import distributed as D
    from ..engine.allocate import parse_min_keep
    from ..checkpoint import load_checkpoint, save_chanprune, tool_version
    from ..data import check_labels, open_dataset
    from ..support.device import resolve_device
    from ..measure import count_macs, count_params
    from ..models import build_model
    from ..report import json_document, make_console, write_json
    from ..models import widened_spec
    from ..train import CheckpointInfo, Trainer, load_train_state, model_from_state

    if min_keep is not None:
        parse_min_keep(min_keep)
    with D.distributed_session(resolve_device(device_name)) as (env, device):
        console = make_console(stderr=json_out == "-")
        say = console.print if env.is_main else (lambda *a, **k: None)

        loaded = load_model(ckpt, arch, arch_kwargs, trust_pickle)
        if loaded.arch is None:
            raise UserError("this pickled model has no architecture to rebuild it from; pass --arch as well")
        shape = resolve_input_shape(shape, loaded)
        if not dcph:  # DCPH trains a new, wider model: the checkpoint's weights are not used
            refuse_nonfinite(loaded.model, "fine-tune")
        spec, model = loaded.arch, loaded.model
        history, plans = list(loaded.history), list(loaded.plans)
        if dcph:
            if loaded.plans:
                raise UserError("--dcph starts from an unpruned built-in architecture; this checkpoint is already pruned")
            spec = widened_spec(loaded.arch, 2.0)
            torch.manual_seed(cfg.seed)
            model = build_model(spec)
            history = [{"command": "finetune", "dcph": True, "from": str(ckpt), "arch": loaded.arch.to_json(),
                        "note": "2x-wide architecture trained from initialisation (weights of the checkpoint unused)"}]
            plans = []
        state = None
        if resume:
            state = load_train_state(paths.state)
            if state.get("arch") != spec.to_json():
                raise UserError(f"the state at {paths.state} belongs to architecture {state.get('arch')}, not {spec}")
            model = model_from_state(state)

        train_set = open_dataset(data, input_shape=shape, mean=mean, std=std, train=cfg.augment)
        val_set = open_dataset(val_data, input_shape=shape, mean=mean, std=std, train=False) if val_data else None
        classes = _num_classes(model, shape)
        check_labels(train_set, classes)
        if val_set is not None:
            check_labels(val_set, classes)

        teacher_model = None
        if teacher is not None:
            t_loaded = load_checkpoint(teacher, arch=teacher_arch or loaded.arch, arch_kwargs=teacher_arch_kwargs,
                                       trust_pickle=trust_pickle)
            if _num_classes(t_loaded.model, shape) != classes:
                raise UserError(f"the teacher outputs {_num_classes(t_loaded.model, shape)} classes, the student {classes}")
            refuse_nonfinite(t_loaded.model, "distil from")
            teacher_model = t_loaded.model

        hook = make_schedule(schedule, input_shape=shape, ratio=ratio, target_flops=target_flops,
                             interval=prune_every, until=prune_until, min_keep=min_keep, round_to=round_to,
                             ignore=ignore, seed=cfg.seed, drop_prob=drop_prob, rounds=cac_rounds, lam=mask_lambda)
        before = {"params": count_params(model), "macs": count_macs(copy.deepcopy(model).eval(), shape)}
        entry = {"command": "finetune", "data": data, "val_data": val_data, "schedule": schedule,
                 "requested": {"ratio": ratio, "target_flops": target_flops} if hook is not None else None,
                 "teacher": teacher, "kd": {"alpha": cfg.kd_alpha, "temperature": cfg.kd_temperature} if teacher else None,
                 "config": cfg.result_fields(), "world_size": env.world_size, "device": str(device),
                 "dcph": dcph or None}
        info = CheckpointInfo(arch=spec, input_shape=shape, history=history, plans=plans, meta=loaded.meta, entry=entry)

        def on_eval(row: dict[str, Any]) -> None:
            mark = "  [green]best[/green]" if row["best"] else ""
            loss = f"{row['train_loss']:.4f}" if row.get("train_loss") is not None else "-"
            say(f"epoch {row['epoch']:.2f}  step {row['step']}  train loss {loss}  "
                f"val top-1 {row['top1']:.2f} %  top-5 {row['top5']:.2f} %  val loss {row['loss']:.4f}{mark}")

        def log(text: str) -> None:
            if env.is_main:
                typer.echo(text, err=True)

        trainer = Trainer(model, train_set, cfg, device=device, val_set=val_set, teacher=teacher_model,
                          hooks=[hook] if hook is not None else [], env=env, outputs=paths, ckpt=info, log=log,
                          on_eval=on_eval)
        if state is not None:
            trainer.restore(state)
        where = f"{env.world_size} processes ({env.backend})" if env.distributed else str(device)
        say(f"[bold]finetune[/bold] {ckpt} → {paths.out}")
        say(f"  model {spec}  params {before['params']:,}  MACs {before['macs']:,}  on {where}")
        say(f"  {trainer.total_steps} steps ({trainer.total_steps / trainer.steps_per_epoch:.2f} epochs of "
            f"{trainer.steps_per_epoch}), global batch {cfg.batch_size}, lr {cfg.lr:g} (warm-up + cosine), "
            f"schedule {schedule}" + (f", teacher {teacher}" if teacher else "")
            + (f"; resuming at step {trainer.step}" if state is not None else ""))

        result = trainer.fit()
        model = result.model
        after = {"params": count_params(model), "macs": count_macs(copy.deepcopy(model).cpu().eval(), shape)}
        final_entry = {**entry, "steps": result.steps, "validation": result.final, "best": result.best,
                       "before": before, "after": after, "schedules": result.hook_summaries,
                       "train_images_per_second": result.images_per_second, "tool_version": tool_version()}
        if env.is_main:
            save_chanprune(paths.out, model, spec, input_shape=shape, history=[*history, final_entry],
                           plans=[*plans, *result.plans], meta=loaded.meta, force=True)
            if not keep_state:
                for p in (paths.state, paths.last):
                    p.unlink(missing_ok=True)
        D.barrier(env)
        if not env.is_main:
            return
        _render(console, result, before, after, paths, val_set is not None)
        if json_out is not None:
            body = {"checkpoint": ckpt, "output": str(paths.out),
                    "best_output": str(paths.best) if result.best is not None else None,
                    "schedule": schedule, "requested": entry["requested"], "teacher": teacher,
                    "config": cfg.result_fields(), "world_size": env.world_size, "device": str(device),
                    "steps": result.steps, "epochs": result.epochs_done, "resumed_from": result.resumed_from,
                    "train": {"images": result.train_images, "seconds": result.train_seconds,
                              "images_per_second": result.images_per_second},
                    "evals": result.evals, "final": result.final, "best": result.best,
                    "before": before, "after": after, "schedules": result.hook_summaries, "plans": result.plans}
            write_json(json_document("finetune", body, seed=cfg.seed), json_out)


def _num_classes(model: Any, shape: tuple[int, int, int]) -> int:
    import torch

    from ..criteria.gates import logits_of

    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = logits_of(model(torch.zeros(2, *shape)))
    finally:
        model.train(was)
    if out.dim() != 2:
        raise UserError(f"finetune needs a classifier: the model returns shape {tuple(out.shape)}, expected (batch, classes)")
    return int(out.shape[1])


def _render(console: Console, result: Any, before: dict[str, int], after: dict[str, int], paths: Any, has_val: bool) -> None:
    from rich.table import Table

    from ..report import human_count

    if result.evals:
        table = Table(title="validation", title_justify="left")
        for col in ("epoch", "step", "train loss", "top-1 %", "top-5 %", "val loss", ""):
            table.add_column(col, justify="right" if col else "left")
        for row in result.evals:
            table.add_row(f"{row['epoch']:.2f}", str(row["step"]),
                          f"{row['train_loss']:.4f}" if row.get("train_loss") is not None else "-",
                          f"{row['top1']:.2f}", f"{row['top5']:.2f}", f"{row['loss']:.4f}",
                          "best" if row.get("best") else "")
        console.print(table)
    console.print(f"steps      {result.steps} ({result.epochs_done:.2f} epochs)"
                  + (f", resumed at step {result.resumed_from}" if result.resumed_from is not None else ""))
    console.print(f"throughput {result.images_per_second:,.0f} images/s (training steps, data loading included)")
    if before != after:
        console.print(f"params     {before['params']:,} → {after['params']:,} ({human_count(after['params'])})")
        console.print(f"MACs       {before['macs']:,} → {after['macs']:,} "
                      f"(−{100 * (1 - after['macs'] / max(before['macs'], 1)):.1f} %)")
    for name, summary in result.hook_summaries.items():
        verify = summary.get("verify")
        if verify:
            console.print(f"{name:<10} removed physically; verify max |diff| {verify['max_abs_diff']:.3g} "
                          f"≤ {verify['tolerance']:.3g}: {'passed' if verify['passed'] else 'FAILED'}")
    if result.final is not None:
        console.print(f"final      top-1 {result.final['top1']:.2f} %  top-5 {result.final['top5']:.2f} %")
    console.print(f"saved      {paths.out}" + (f" (best: {paths.best}, top-1 {result.best['top1']:.2f} % at step {result.best['step']})"
                                                if result.best is not None and has_val else ""))
