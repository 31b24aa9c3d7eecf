"""`chanprune finetune`: fine-tune a (pruned) model, optionally pruning during training (train.py)."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from ..errors import UserError
from . import options as opt
from .app import app
from .configfiles import prefer_flags

TRAIN_PANEL = "Training"
KD_PANEL = "Distillation"
SCHEDULE_PANEL = "Pruning schedule"
RUN_PANEL = "Runtime"


@app.command(
    epilog=opt.examples(
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
@opt.shared_options
def finetune(
    ckpt: opt.CkptArg = None,
    data: opt.DataOpt = None,
    val_data: Annotated[Optional[str], typer.Option("--val-data", metavar="VAL", help="Validation data (same forms as --data), evaluated every epoch (or --eval-every steps); the best model is kept as <out>.best.", rich_help_panel=opt.DATA_PANEL, show_default=False)] = None,
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
    augment: Annotated[bool, typer.Option("--augment/--no-augment", help="Random crop (pad 4 at 32 px) + flip for small images, random-resized crop + flip for large ones (no flip for digits; 1-D signals are never augmented).", rich_help_panel=TRAIN_PANEL)] = True,
    loss: Annotated[str, typer.Option("--loss", metavar="auto|ce|bce|mse", help="The loss on labels: ce (cross-entropy, one class per sample), bce (binary cross-entropy of every output against the one-hot label: sigmoid, multi-label outputs), mse (squared error against it). auto: bce when the outputs lie in [0, 1] without summing to 1 (a sigmoid), else ce.", rich_help_panel=TRAIN_PANEL)] = "auto",
    teacher: Annotated[Optional[str], typer.Option("--teacher", metavar="CKPT", help="Distil from this model (usually the unpruned original): (1-α)·CE + α·T²·KL(teacher ‖ student) at temperature T. Without labels (a model with no class logits: detector, segmenter, YOLO, several outputs; or --data without class folders): the teacher's outputs alone, each output's squared error relative to the teacher's scale, summed; the teacher gap is reported.", rich_help_panel=KD_PANEL, show_default=False)] = None,
    teacher_arch: Annotated[Optional[str], typer.Option("--teacher-arch", metavar="ARCH", help="Architecture of a --teacher state dict (default: the student's base architecture).", rich_help_panel=KD_PANEL, show_default=False)] = None,
    teacher_arch_kwargs: Annotated[Optional[str], typer.Option("--teacher-arch-kwargs", metavar="JSON", help="Factory kwargs for --teacher-arch.", rich_help_panel=KD_PANEL, show_default=False)] = None,
    kd_alpha: Annotated[float, typer.Option("--kd-alpha", metavar="α", help="Weight of the distillation term.", rich_help_panel=KD_PANEL)] = 0.5,
    kd_temperature: Annotated[float, typer.Option("--kd-temperature", metavar="T", help="Softmax temperature of the distillation term.", rich_help_panel=KD_PANEL)] = 4.0,
    distil_features: Annotated[Optional[list[str]], typer.Option("--distil-features", metavar="GLOB", help="Label-free distillation: also match the outputs of the modules matching GLOB (repeatable; backbone or neck stages), each like an output; where pruning narrowed one, a 1x1 projection is trained along and dropped after.", rich_help_panel=KD_PANEL, show_default=False)] = None,
    schedule: Annotated[str, typer.Option("--schedule", metavar="none|asfp|sfp|cac|whitebox", help="Prune while training: asfp: asymptotic soft filter pruning (rate P·(1−4^(−t/D)), filters re-selected every interval, removed at the end); sfp: the same at a constant rate; cac: online conditional-accuracy-change gates removing channels early in training (reconstructed); whitebox: class-wise masks trained on frozen weights, global-voting removal and BN rescaling, then fine-tuning.", rich_help_panel=SCHEDULE_PANEL)] = "none",
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
    amp: Annotated[str, typer.Option("--amp", metavar="auto|off|bf16|fp16", help="Mixed precision. CUDA: auto is bf16 where supported, else fp16. CPU: auto is float32; bf16 runs natively on CPUs with AVX512-BF16 or AMX (a distilled ResNet-56 fine-tune: 1.5-1.8x faster there), refused elsewhere.", rich_help_panel=RUN_PANEL)] = "auto",
    channels_last: Annotated[Optional[bool], typer.Option("--channels-last/--no-channels-last", help="Channels-last memory format for the trained model (default: on CUDA; on the CPU only the teacher runs channels-last).", rich_help_panel=RUN_PANEL, show_default=False)] = None,
    tensor_cache: Annotated[Optional[bool], typer.Option("--tensor-cache/--no-tensor-cache", help="Hold small images (up to 64 px) as one tensor on the device, decoded once (image folders: cached in the cache folder), and crop, flip and normalise each batch there: same batches as decoding every step, without the decoding (default: whenever the data allows it).", rich_help_panel=RUN_PANEL, show_default=False)] = None,
    device_decode: Annotated[bool, typer.Option("--device-decode", help="Large JPEG training images: decode, crop, resize and flip each batch on the device (nvJPEG on a GPU) instead of in loader workers, which then only read the files. Same crops and flips as the default path; pixels within rounding of it. For GPU runs whose loader cannot keep up (measure with bench/gpu_check.py).", rich_help_panel=RUN_PANEL)] = False,
    compile_model: Annotated[bool, typer.Option("--compile", help="torch.compile the forward passes (the first step compiles; pays off on GPUs for long runs). Not with --schedule.", rich_help_panel=RUN_PANEL)] = False,
    eval_every: Annotated[Optional[int], typer.Option("--eval-every", metavar="STEPS", min=1, help="Validate every STEPS steps instead of every epoch.", rich_help_panel=RUN_PANEL, show_default=False)] = None,
    eval_batch_size: Annotated[Optional[int], typer.Option("--eval-batch-size", metavar="B", min=1, help="Batch size of validation passes (default: max(batch, 128)).", rich_help_panel=RUN_PANEL, show_default=False)] = None,
    val_images: Annotated[Optional[int], typer.Option("--val-images", metavar="N", min=1, help="Validate on a fixed random subset of N images of --val-data (quick checks).", rich_help_panel=RUN_PANEL, show_default=False)] = None,
    save_every: Annotated[int, typer.Option("--save-every", metavar="STEPS", min=1, help="Save the resumable state every STEPS steps (and at every epoch end and on Ctrl-C / SIGTERM).", rich_help_panel=RUN_PANEL)] = 200,
    log_every: Annotated[int, typer.Option("--log-every", metavar="STEPS", min=1, help="Log line interval when stderr is not a terminal.", rich_help_panel=RUN_PANEL)] = 50,
    resume: Annotated[bool, typer.Option("--resume", help="Continue an interrupted run from <out>.state.pt (same options; same result as an uninterrupted run).", rich_help_panel=RUN_PANEL)] = False,
    keep_state: Annotated[bool, typer.Option("--keep-state", help="Keep <out>.last and <out>.state.pt after the run completes.", rich_help_panel=opt.OUTPUT_PANEL)] = False,
    out: Annotated[Optional[str], typer.Option("--out", metavar="PATH", help="Fine-tuned checkpoint (default: CKPT-STEM.finetuned.safetensors in the working directory).", rich_help_panel=opt.OUTPUT_PANEL, show_default=False)] = None,
    model: opt.ModelOptions = opt.MODEL,
    batch_size: opt.BatchSizeOpt = 64,
    workers: Annotated[Optional[int], typer.Option("--workers", metavar="N", min=0, help="Loader processes for decoding and augmentation (0: in the main process). Default: on CUDA one per spare CPU up to 8, on the CPU 0 (training uses every core). The result does not depend on it.", rich_help_panel=opt.DATA_PANEL, show_default=False)] = None,
    seed: opt.SeedOpt = 0,
    outputs: opt.Outputs = opt.OUTPUTS,
    config: opt.ConfigOpt = None,
    debug: opt.DebugOpt = False,
) -> None:
    """Fine-tune a model (SGD + warm-up/cosine, optional distillation), or prune it while training
    (asfp / sfp / cac / whitebox). Resumable, distributed under torchrun. --batch-size is the global batch."""
    from ..project.state import follow_last_model, record_model

    if ckpt is None:  # the newest model made here, if any
        followed = follow_last_model("finetune")
        ckpt = followed["path"] if followed is not None else None
    if ckpt is None:
        raise UserError("give a checkpoint to fine-tune: chanprune finetune CKPT --data TRAIN --out F.safetensors")
    if data is None:
        raise UserError("give training data: --data (an ImageFolder, a .tar.gz of one, digits:train, synthetic:CxHxW:K:N ...)")
    ratio, target_flops = prefer_flags(ratio=ratio, target_flops=target_flops).values()
    from ..recipes.finetune import FinetuneOptions, ScheduleOptions, finetune_checkpoint
    from ..report import finetune as report
    from ..support.console import make_console
    from ..train import TrainConfig
    from ..train.process import Stopped

    cfg = TrainConfig(epochs=epochs, max_steps=max_steps, batch_size=batch_size, lr=lr, momentum=momentum,
                      nesterov=nesterov, weight_decay=weight_decay, decay_norm_and_bias=decay_norm_bias,
                      warmup=warmup, min_lr=min_lr, label_smoothing=label_smoothing, kd_alpha=kd_alpha,
                      kd_temperature=kd_temperature, amp=amp, channels_last=channels_last, grad_clip=grad_clip,
                      seed=seed, augment=augment, loss=loss, workers=workers, tensor_cache=tensor_cache,
                      device_decode=device_decode, compile=compile_model, eval_every=eval_every,
                      eval_batch_size=eval_batch_size, val_images=val_images, save_every=save_every,
                      log_every=log_every)
    pruning = ScheduleOptions(schedule, ratio=ratio, target_flops=target_flops, prune_every=prune_every,
                              prune_until=prune_until, cac_rounds=cac_rounds, drop_prob=drop_prob, dcph=dcph,
                              mask_lambda=mask_lambda, min_keep=min_keep, round_to=round_to, ignore=ignore or ())
    options = FinetuneOptions(data, out=out, val_data=val_data, train=cfg, teacher=teacher, teacher_arch=teacher_arch,
                              teacher_arch_kwargs=teacher_arch_kwargs, distil_features=distil_features or (),
                              schedule=pruning, model=model, threads=model.threads,
                              resume=resume, keep_state=keep_state, force=outputs.force,
                              json_report=outputs.json_report)
    console = make_console(stderr=outputs.json_report == "-")
    try:
        result = finetune_checkpoint(ckpt, options, show=console.print)
    except Stopped as stopped:  # the state is saved: say how to continue, exit as the signal asks
        if not opt.in_run():  # a stage of `chanprune run`, which says how to continue the run
            typer.echo("to continue, re-run the same command with --resume", err=True)
        raise typer.Exit(stopped.exit_code) from None
    if result is None:  # a torchrun process other than rank 0
        return
    record_model("finetune", ckpt, str(result.paths.out))
    report.show(result, outputs.json_report)

