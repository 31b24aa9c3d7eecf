"""`chanprune export`: ONNX, TorchScript or a plain safetensors state dict, each verified before it is kept."""

from __future__ import annotations

import math
from typing import Annotated

import typer

from ..errors import UserError
from .common import (
    OUTPUT_PANEL,
    ArchKwargsOpt,
    ArchOpt,
    CkptArg,
    ConfigOpt,
    DebugOpt,
    DeviceOpt,
    ForceOpt,
    InputShapeOpt,
    JsonOpt,
    TrustPickleOpt,
    app,
    check_distinct_outputs,
    examples,
    load_model,
    refuse_nonfinite,
    resolve_input_shape,
    validate_common,
)

_FORMATS_TEXT = "onnx, torchscript or safetensors"


@app.command(
    epilog=examples(
        ("ONNX (opset 17, dynamic batch axis), checked with onnxruntime",
         "chanprune export pruned.safetensors --format onnx --out model.onnx"),
        ("TorchScript; the format follows from the suffix (.onnx, .pt/.ts, .safetensors)",
         "chanprune export pruned.safetensors --out model.ts --json export.json"),
        ("a plain state dict + model.safetensors.json (architecture, pruned widths) for PyTorch without chanprune",
         "chanprune export pruned.safetensors --format safetensors --out model.safetensors"),
        ("a torchvision model at another input size and opset",
         "chanprune export r18.pt --arch torchvision:resnet18 --input-shape 3,160,160 --format onnx --opset 13 --out r18.onnx"),
    ),
)
def export(
    ctx: typer.Context,
    ckpt: CkptArg = None,
    format_: Annotated[str | None, typer.Option("--format", metavar="FORMAT", help="[b]onnx[/b], [b]torchscript[/b] or [b]safetensors[/b] (default: from the --out suffix: .onnx, .pt/.ts, .safetensors).", show_default=False)] = None,
    out: Annotated[str | None, typer.Option("--out", metavar="PATH", help="Output file; a safetensors export also writes PATH.json (the architecture spec).", rich_help_panel=OUTPUT_PANEL, show_default=False)] = None,
    opset: Annotated[int, typer.Option("--opset", metavar="N", help="ONNX opset version (onnx only).")] = 17,
    tolerance: Annotated[float, typer.Option("--tolerance", metavar="R", help="Relative tolerance of the check: the export fails when max |export − PyTorch| > R × max(1, max |PyTorch output|).")] = 1e-4,
    arch: ArchOpt = None,
    arch_kwargs: ArchKwargsOpt = None,
    input_shape: InputShapeOpt = None,
    trust_pickle: TrustPickleOpt = False,
    device: DeviceOpt = "cpu",
    json_out: JsonOpt = None,
    force: ForceOpt = False,
    config: ConfigOpt = None,
    debug: DebugOpt = False,
) -> None:
    """Export to ONNX, TorchScript or plain safetensors; every export is checked before it is kept.

    The exported file is read back (onnxruntime on the CPU, torch.jit.load on --device, or safetensors + load_state_dict without chanprune) and run on the same random inputs as the PyTorch model at batch sizes 1 and 3; it is exported at batch 2, so the batch axis is proven dynamic. A difference above --tolerance is an error (exit 1) and nothing is written.
    """
    from ..deploy import export as exporter

    if ckpt is None:
        raise UserError("give a checkpoint to export: chanprune export CKPT --format onnx --out model.onnx")
    if out is None:
        raise UserError("give an output file: --out model.onnx (or .pt, .safetensors)")
    if format_ is None:
        fmt = exporter.infer_format(out)
        if fmt is None:
            raise UserError(f"cannot tell the export format from {out!r}; pass --format ({_FORMATS_TEXT})")
    else:
        fmt = format_.strip().lower()
        if fmt not in exporter.FORMATS:
            raise UserError(f"unknown --format {format_!r}; choose {_FORMATS_TEXT}")
    # By name: ParameterSource lives in click or in typer's vendored copy, depending on the version.
    if fmt != "onnx" and getattr(ctx.get_parameter_source("opset"), "name", None) == "COMMANDLINE":
        typer.echo(f"warning: --opset only applies to --format onnx; ignored for {fmt}", err=True)
    if not (math.isfinite(tolerance) and tolerance > 0):
        raise UserError(f"--tolerance must be a positive number (a relative tolerance such as 1e-4), got {tolerance:g}")
    shape, _, _ = validate_common(input_shape, None, None, json_out, force)
    if fmt == "onnx":
        exporter.check_opset(opset)
        exporter.require_onnx()
    from ..support.device import resolve_device
    from ..support.fsutil import check_output

    dev = resolve_device(device)
    check_output(out, force)
    spec_path = str(exporter.spec_path_for(out)) if fmt == "safetensors" else None
    if spec_path is not None:
        check_output(spec_path, force)
    check_distinct_outputs(("--out", out), ("--json", json_out), ("the spec file (--out + .json)", spec_path))

    from ..report import export_document, make_console, render_export, write_json

    loaded = load_model(ckpt, arch, arch_kwargs, trust_pickle)
    shape = resolve_input_shape(shape, loaded)
    model = loaded.model.eval()
    refuse_nonfinite(model, "export")
    if fmt == "safetensors" and loaded.arch is None:
        raise UserError("this pickled model records no architecture to put in the safetensors spec; pass --arch "
                        "(the factory that builds it), or use --format onnx or torchscript")
    result = exporter.export_model(fmt, model, out, shape, arch=loaded.arch, opset=opset, rtol=tolerance,
                                   device=dev)
    render_export(ckpt, result, make_console(stderr=json_out == "-"))
    if json_out is not None:
        write_json(export_document(ckpt, result, arch=loaded.arch), json_out)
