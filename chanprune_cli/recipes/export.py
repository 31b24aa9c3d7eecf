"""The `export` recipe: a checkpoint as ONNX, TorchScript or a plain safetensors state dict, each
read back and checked against PyTorch before it is kept (deploy/export.py)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ..deploy import export as exporter
from ..errors import UserError
from ..support.device import resolve_device
from ..support.fsutil import check_output
from .opening import ModelOptions, open_model
from .steps import check_distinct_outputs, check_json_report, recipe_entry

if TYPE_CHECKING:
    from ..models import ArchSpec

__all__ = ["ExportOptions", "ExportOutcome", "export_checkpoint", "export_format"]

_FORMATS_TEXT = "onnx, torchscript or safetensors"


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


@dataclass(frozen=True)
class ExportOptions:
    """What `export_checkpoint` does besides the checkpoint; names and defaults as the options of
    `chanprune export`. `format` (None: from `out`'s suffix: .onnx, .pt/.ts, .safetensors; a
    safetensors export also writes `out`.json, the architecture spec) is resolved when the options
    are made. `tolerance`: the export fails when it differs from PyTorch by more than `tolerance` ×
    max(1, max |output|). `opset` and `spatial_axes` apply to ONNX only: height and width are
    dynamic for a fully convolutional model ("auto"), always ("dynamic", checked at twice the size
    too) or never ("fixed"). `model.device` is where TorchScript is checked (the command's default:
    cpu). `json_report`: where the caller will write the JSON report, checked before the slow steps."""

    out: str
    format: str | None = None
    opset: int = exporter.DEFAULT_OPSET
    tolerance: float = exporter.DEFAULT_RTOL
    spatial_axes: str = "auto"
    model: ModelOptions = field(default_factory=lambda: ModelOptions(device="cpu"))
    force: bool = False
    json_report: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "format", export_format(self.out, self.format))
        if not (math.isfinite(self.tolerance) and self.tolerance > 0):
            raise UserError(f"--tolerance must be a positive number (a relative tolerance such as 1e-4), got {self.tolerance:g}")


@dataclass
class ExportOutcome:
    """What `export_checkpoint` wrote and how closely it reproduces the model."""

    checkpoint: str
    arch: ArchSpec | None  # the checkpoint's architecture (None: a bare pickled module)
    exported: exporter.ExportResult  # path, format, spec_path, per-batch differences, passed, ...


@recipe_entry
def export_checkpoint(checkpoint: str, options: ExportOptions) -> ExportOutcome:
    """Export `checkpoint` as `options` say. The exported file is read back and run on the same
    random inputs as the PyTorch model at batch sizes 1 and 3; a difference above the tolerance is
    an error and nothing is written."""
    o = options
    fmt, out, spatial_axes = str(o.format), o.out, o.spatial_axes
    check_json_report(o.json_report, o.force)
    if fmt == "onnx":
        exporter.check_opset(o.opset)
        spatial_axes = exporter.check_spatial_axes(spatial_axes)
        exporter.require_onnx()
    dev = resolve_device(o.model.device)
    check_output(out, o.force)
    spec_path = str(exporter.spec_path_for(out)) if fmt == "safetensors" else None
    if spec_path is not None:
        check_output(spec_path, o.force)
    check_distinct_outputs(("--out", out), ("--json", o.json_report), ("the spec file (--out + .json)", spec_path))

    # export takes no normalisation or task output: it writes the whole model, every output
    opened = open_model(checkpoint, o.model, refuse="export", recorded=False)
    model, arch = opened.model.eval(), opened.loaded.arch
    if fmt == "safetensors" and arch is None:
        raise UserError("this pickled model records no architecture to put in the safetensors spec; pass --arch "
                        "(the factory that builds it), or use --format onnx or torchscript")
    exported = exporter.export_model(fmt, model, out, opened.input_shape, arch=arch, opset=o.opset, rtol=o.tolerance,
                                     device=dev, spatial_axes=spatial_axes)
    return ExportOutcome(checkpoint, arch, exported)
