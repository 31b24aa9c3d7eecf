"""`chanprune export`: ONNX, TorchScript or a plain safetensors state dict, each verified before it is kept."""

from __future__ import annotations

from typing import Annotated

import typer

from ..errors import UserError
from . import options as opt
from .app import app
from .configfiles import given_as_flag

# export writes the whole model, every output: no normalisation, classes or task output to choose
_MODEL = opt.MODEL.only("arch", "arch_kwargs", "input_shape", "trust_pickle", "device", "threads", device="cpu")


@app.command(
    epilog=opt.examples(
        ("ONNX (opset 17, dynamic batch axis), checked with onnxruntime",
         "chanprune export pruned.safetensors --format onnx --out model.onnx"),
        ("TorchScript; the format follows from the suffix (.onnx, .pt/.ts, .safetensors)",
         "chanprune export pruned.safetensors --out model.ts --json export.json"),
        ("a plain state dict + model.safetensors.json (architecture, pruned widths) for PyTorch without chanprune",
         "chanprune export pruned.safetensors --format safetensors --out model.safetensors"),
        ("a torchvision model at another input size and opset",
         "chanprune export r18.pt --arch torchvision:resnet18 --input-shape 3,160,160 --format onnx --opset 13 --out r18.onnx"),
        ("a classifier whose ONNX graph takes any image size (checked at the given size and at twice it)",
         "chanprune export r18.pt --arch torchvision:resnet18 --format onnx --spatial-axes dynamic --out r18.onnx"),
    ),
)
@opt.shared_options
def export(
    ctx: typer.Context,
    ckpt: opt.CkptArg = None,
    format_: Annotated[str | None, typer.Option("--format", metavar="FORMAT", help="onnx, torchscript or safetensors (default: from the --out suffix: .onnx, .pt/.ts, .safetensors).", show_default=False)] = None,
    out: Annotated[str | None, typer.Option("--out", metavar="PATH", help="Output file; a safetensors export also writes PATH.json (the architecture spec).", rich_help_panel=opt.OUTPUT_PANEL, show_default=False)] = None,
    opset: Annotated[int, typer.Option("--opset", metavar="N", help="ONNX opset version (onnx only).")] = 17,
    spatial_axes: Annotated[str, typer.Option("--spatial-axes", metavar="auto|dynamic|fixed", help="ONNX height and width: dynamic for a fully convolutional model, one whose output size follows the input's (auto); dynamic for any model (dynamic, e.g. a classifier with global pooling); or fixed at --input-shape (fixed). Dynamic axes are checked at --input-shape and at twice its height and width (onnx only).")] = "auto",
    tolerance: Annotated[float, typer.Option("--tolerance", metavar="R", help="Relative tolerance of the check: the export fails when max |export − PyTorch| > R × max(1, max |PyTorch output|).")] = 1e-4,
    model: opt.ModelOptions = _MODEL,
    outputs: opt.Outputs = opt.OUTPUTS,
    config: opt.ConfigOpt = None,
    debug: opt.DebugOpt = False,
) -> None:
    """Export to ONNX, TorchScript or plain safetensors; every export is checked before it is kept.

    The exported file is read back (onnxruntime on the CPU, torch.jit.load on --device, or safetensors + load_state_dict without chanprune) and run on the same random inputs as the PyTorch model at batch sizes 1 and 3; it is exported at batch 2, so the batch axis is proven dynamic. A difference above --tolerance is an error (exit 1) and nothing is written.
    """
    if ckpt is None:  # the newest model made here, if any
        from ..project.state import follow_last_model

        followed = follow_last_model("export")
        ckpt = followed["path"] if followed is not None else None
    if ckpt is None:
        raise UserError("give a checkpoint to export: chanprune export CKPT --format onnx --out model.onnx")
    if out is None:
        raise UserError("give an output file: --out model.onnx (or .pt, .safetensors)")
    from ..recipes.export import ExportOptions, export_checkpoint
    from ..report import export as report

    options = ExportOptions(out, format=format_, opset=opset, tolerance=tolerance, spatial_axes=spatial_axes,
                            model=model, force=outputs.force, json_report=outputs.json_report)
    for option, name in (("--opset", "opset"), ("--spatial-axes", "spatial_axes")):
        if options.format != "onnx" and given_as_flag(ctx, name):  # typed by the user: not the default or a config value
            typer.echo(f"warning: {option} only applies to --format onnx; ignored for {options.format}", err=True)
    report.show(export_checkpoint(ckpt, options), outputs.json_report)
