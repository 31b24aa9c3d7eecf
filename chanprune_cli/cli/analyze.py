"""`chanprune analyze`: layers, params, MACs, channel groups and accuracy of a checkpoint."""

from __future__ import annotations

from typing import Annotated

import typer

from .app import app
from .options import (
    MODEL_PANEL,
    ArchKwargsOpt,
    ArchOpt,
    BatchSizeOpt,
    CalibBatchesOpt,
    CkptArg,
    ClassesOpt,
    ConfigOpt,
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
        ("layers, params, MACs and accuracy of a CIFAR ResNet-56 state dict",
         "chanprune analyze resnet56.th --arch cifar_resnet56 --data cifar10-test.tar.gz --mean 0.485,0.456,0.406 --std 0.229,0.224,0.225"),
        ("a torchvision model with 10 classes, report as JSON",
         "chanprune analyze model.pt --arch torchvision:resnet18 --arch-kwargs '{\"num_classes\": 10}' --input-shape 3,224,224 --json report.json"),
        ("quick accuracy estimate on 5 random batches",
         "chanprune analyze model.pt --arch cifar_resnet20 --data test/ --calib-batches 5 --batch-size 100"),
        ("the built-in architectures", "chanprune analyze --list-archs"),
    ),
)
def analyze(
    ckpt: CkptArg = None,
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
    list_archs: Annotated[bool, typer.Option("--list-archs", help="List the built-in architectures and exit.", rich_help_panel=MODEL_PANEL)] = False,
    config: ConfigOpt = None,
    debug: DebugOpt = False,
) -> None:
    """Show a model's layers, parameters, MACs, size and (with --data) top-1/top-5 accuracy."""
    if list_archs:
        from ..report.analyze import show_archs

        show_archs()
        return
    if ckpt is None:
        raise typer.BadParameter("give a checkpoint path (or --list-archs)", param_hint="'CKPT'")
    from ..recipes.analyze import analyze_checkpoint
    from ..report import analyze as report

    result = analyze_checkpoint(ckpt, arch=arch, arch_kwargs=arch_kwargs, input_shape=input_shape,
                              trust_pickle=trust_pickle, device=device, data=data, mean=mean, std=std,
                              batch_size=batch_size, workers=workers, seed=seed, calib_batches=calib_batches,
                              classes=classes, output=task_output, through_layernorm=through_layernorm, force=force,
                              json_report=json_out)
    report.show(result, json_out)

