"""`chanprune score`: score every prunable channel with a criterion and save the scores."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from ..errors import UserError
from .app import app
from .options import (
    OUTPUT_PANEL,
    ArchKwargsOpt,
    ArchOpt,
    BatchSizeOpt,
    CalibBatchesOpt,
    ClassesOpt,
    CkptArg,
    ConfigOpt,
    CriterionOpt,
    CriterionOptionOpt,
    DataOpt,
    DebugOpt,
    DeviceOpt,
    ForceOpt,
    InputShapeOpt,
    JsonOpt,
    MeanOpt,
    SeedOpt,
    StdOpt,
    TaskOutputOpt,
    ThroughLayerNormOpt,
    TrustPickleOpt,
    WorkersOpt,
    examples,
)


@app.command(
    epilog=examples(
        ("second-order sensitivity on 20 calibration batches",
         "chanprune score resnet56.th --arch cifar_resnet56 --criterion sensitivity --data train.tar.gz --calib-batches 20 --out r56.sens.safetensors"),
        ("a weight-only criterion needs no data",
         "chanprune score model.pt --arch torchvision:resnet18 --criterion fpgm --out r18.fpgm.safetensors"),
        ("scores land in the working directory (resnet56.th.l1.scores.safetensors); a plain `prune` then uses them",
         "chanprune score resnet56.th --arch cifar_resnet56 --criterion l1 && chanprune prune --ratio 0.5"),
        ("then prune with those scores", "chanprune prune resnet56.th --arch cifar_resnet56 --scores r56.sens.safetensors --target-flops 0.5 --out p.safetensors"),
    ),
)
def score(
    ckpt: CkptArg = None,
    criterion: CriterionOpt = None,
    criterion_opt: CriterionOptionOpt = None,
    list_criteria: Annotated[bool, typer.Option("--list-criteria", help="List the criteria with what they need and their options (KEY=default), then exit.")] = False,
    out: Annotated[Optional[str], typer.Option("--out", metavar="PATH", help="Scores file (default: CKPT-NAME.CRITERION.scores.safetensors in the working directory).", rich_help_panel=OUTPUT_PANEL, show_default=False)] = None,
    ratio: Annotated[float, typer.Option("--ratio", metavar="R", help="For the summary: how many channels of each layer this ratio would remove.")] = 0.5,
    arch: ArchOpt = None,
    arch_kwargs: ArchKwargsOpt = None,
    input_shape: InputShapeOpt = None,
    trust_pickle: TrustPickleOpt = False,
    device: DeviceOpt = "auto",
    data: DataOpt = None,
    mean: MeanOpt = None,
    std: StdOpt = None,
    batch_size: BatchSizeOpt = 64,
    workers: WorkersOpt = 0,
    seed: SeedOpt = 0,
    calib_batches: CalibBatchesOpt = None,
    classes: ClassesOpt = None,
    task_output: TaskOutputOpt = None,
    through_layernorm: ThroughLayerNormOpt = False,
    json_out: JsonOpt = None,
    force: ForceOpt = False,
    config: ConfigOpt = None,
    debug: DebugOpt = False,
) -> None:
    """Score every prunable channel with a criterion and save the scores for `prune --scores`.

    --list-criteria shows every criterion with its options and defaults; set them with
    --criterion-opt KEY=VALUE (repeatable)."""
    if list_criteria:
        from ..report.score import show_criteria

        show_criteria()
        return
    if ckpt is None or criterion is None:
        raise UserError("give a checkpoint and a criterion: chanprune score CKPT --criterion NAME (see --help)")
    from ..project.state import absolute, record
    from ..recipes.score import score_checkpoint
    from ..report import score as report

    result = score_checkpoint(ckpt, criterion, criterion_options=criterion_opt, out=out, ratio=ratio, arch=arch,
                              arch_kwargs=arch_kwargs, input_shape=input_shape, trust_pickle=trust_pickle,
                              device=device, data=data, mean=mean, std=std, batch_size=batch_size, workers=workers,
                              seed=seed, calib_batches=calib_batches, classes=classes, output=task_output,
                              through_layernorm=through_layernorm, force=force, json_report=json_out)
    if result is None:  # a torchrun process other than rank 0
        return
    record("score", {"checkpoint": absolute(ckpt), "arch": arch, "arch_kwargs": arch_kwargs, "input_shape": input_shape,
                     "trust_pickle": trust_pickle, "criterion": criterion, "criterion_opts": result.criterion.options,
                     "scores": absolute(result.output), "data": data, "mean": mean, "std": std, "output": task_output,
                     "through_layernorm": through_layernorm})
    report.show(result, json_out)

