"""The `export` recipe: a checkpoint as ONNX, TorchScript or a plain safetensors state dict, each
read back and checked against PyTorch before it is kept (deploy/export.py)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..deploy import export as exporter
from ..errors import UserError
from ..support.device import resolve_device
from ..support.fsutil import check_output
from ..checkpoint import refuse_nonfinite
from .steps import (
    ShapeArg,
    check_distinct_outputs,
    check_json_report,
    load_model,
    parse_inputs,
    resolve_input_shape,
)

if TYPE_CHECKING:
    from ..models import ArchSpec

_FORMATS_TEXT = "onnx, torchscript or safetensors"


@dataclass
class ExportOutcome:
    """What `export_checkpoint` wrote and how closely it reproduces the model."""

    checkpoint: str
    arch: ArchSpec | None  # the checkpoint's architecture (None: a bare pickled module)
    exported: exporter.ExportResult  # path, format, spec_path, per-batch differences, passed, ...


def export_format(out: str, format: str | None) -> str:
    """The export format: `format` (any case), else the one `out`'s suffix implies."""
    if format is None:
        fmt = exporter.infer_format(out)
        if fmt is None:
            raise UserError(f"cannot tell the export format from {out!r}; pass --format ({_FORMATS_TEXT})")
        return fmt
    fmt = format.strip().lower()
    if fmt not in exporter.FORMATS:
        raise UserError(f"unknown --format {format!r}; choose {_FORMATS_TEXT}")
    return fmt


def export_checkpoint(
    checkpoint: str,
    out: str,
    *,
    format: str | None = None,
    opset: int = exporter.DEFAULT_OPSET,
    tolerance: float = exporter.DEFAULT_RTOL,
    arch: str | None = None,
    arch_kwargs: str | dict[str, Any] | None = None,
    input_shape: ShapeArg | None = None,
    trust_pickle: bool = False,
    device: str = "cpu",
    force: bool = False,
    json_report: str | None = None,
    spatial_axes: str = "auto",
) -> ExportOutcome:
    """Export `checkpoint` to `out` as `format` (default: from `out`'s suffix: .onnx, .pt/.ts,
    .safetensors; a safetensors export also writes `out`.json, the architecture spec).

    The exported file is read back and run on the same random inputs as the PyTorch model at batch
    sizes 1 and 3; a difference above `tolerance` × max(1, max |output|) is an error and nothing is
    written. `opset` and `spatial_axes` apply to ONNX only: height and width are dynamic for a fully
    convolutional model ("auto"), always ("dynamic", checked at twice the size too) or never
    ("fixed"). `json_report` is where the caller will write the JSON report: checked before the
    slow steps."""
    fmt = export_format(out, format)
    if not (math.isfinite(tolerance) and tolerance > 0):
        raise UserError(f"--tolerance must be a positive number (a relative tolerance such as 1e-4), got {tolerance:g}")
    shape, _, _ = parse_inputs(input_shape, None, None)
    check_json_report(json_report, force)
    if fmt == "onnx":
        exporter.check_opset(opset)
        spatial_axes = exporter.check_spatial_axes(spatial_axes)
        exporter.require_onnx()
    dev = resolve_device(device)
    check_output(out, force)
    spec_path = str(exporter.spec_path_for(out)) if fmt == "safetensors" else None
    if spec_path is not None:
        check_output(spec_path, force)
    check_distinct_outputs(("--out", out), ("--json", json_report), ("the spec file (--out + .json)", spec_path))

    loaded = load_model(checkpoint, arch, arch_kwargs, trust_pickle)
    shape = resolve_input_shape(shape, loaded)
    model = loaded.model.eval()
    refuse_nonfinite(model, "export")
    if fmt == "safetensors" and loaded.arch is None:
        raise UserError("this pickled model records no architecture to put in the safetensors spec; pass --arch "
                        "(the factory that builds it), or use --format onnx or torchscript")
    exported = exporter.export_model(fmt, model, out, shape, arch=loaded.arch, opset=opset, rtol=tolerance, device=dev,
                                     spatial_axes=spatial_axes)
    return ExportOutcome(checkpoint, loaded.arch, exported)
