"""`chanprune analyze`: layers, params, MACs, channel groups and accuracy of a checkpoint."""

from __future__ import annotations

from typing import Annotated

import typer

from . import options as opt
from .app import app


@app.command(
    epilog=opt.examples(
        ("layers, params, MACs and accuracy of a CIFAR ResNet-56 state dict",
         "chanprune analyze resnet56.th --arch cifar_resnet56 --data cifar10-test.tar.gz --mean 0.485,0.456,0.406 --std 0.229,0.224,0.225"),
        ("a torchvision model with 10 classes, report as JSON",
         "chanprune analyze model.pt --arch torchvision:resnet18 --arch-kwargs '{\"num_classes\": 10}' --input-shape 3,224,224 --json report.json"),
        ("quick accuracy estimate on 5 random batches",
         "chanprune analyze model.pt --arch cifar_resnet20 --data test/ --calib-batches 5 --batch-size 100"),
        ("the built-in architectures", "chanprune analyze --list-archs"),
    ),
)
@opt.shared_options
def analyze(
    ckpt: opt.CkptArg = None,
    model: opt.ModelOptions = opt.MODEL,
    data: opt.DataOptions = opt.DATA,
    through_layernorm: opt.ThroughLayerNormOpt = False,
    outputs: opt.Outputs = opt.OUTPUTS,
    list_archs: Annotated[bool, typer.Option("--list-archs", help="List the built-in architectures and exit.", rich_help_panel=opt.MODEL_PANEL)] = False,
    config: opt.ConfigOpt = None,
    debug: opt.DebugOpt = False,
) -> None:
    """Show a model's layers, parameters, MACs, size and (with --data) top-1/top-5 accuracy."""
    if list_archs:
        from ..report.analyze import show_archs

        show_archs()
        return
    if ckpt is None:
        raise typer.BadParameter("give a checkpoint path (or --list-archs)", param_hint="'CKPT'")
    from ..recipes.analyze import AnalyzeOptions, analyze_checkpoint
    from ..report import analyze as report

    options = AnalyzeOptions(model=model, data=data, through_layernorm=through_layernorm, force=outputs.force,
                             json_report=outputs.json_report)
    report.show(analyze_checkpoint(ckpt, options), outputs.json_report)
