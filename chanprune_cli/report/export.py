"""`chanprune export`'s report: the check of the exported file against PyTorch per batch size (and
input size), and its JSON document."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from .common import json_document, print_table, publish

if TYPE_CHECKING:
    from ..recipes.export import ExportOutcome


def show(outcome: ExportOutcome, json_report: str | None) -> None:
    publish(lambda console: render(outcome, console), lambda: document(outcome), json_report)


def document(outcome: ExportOutcome) -> dict[str, Any]:
    """The JSON document of `chanprune export`."""
    result = outcome.exported
    body: dict[str, Any] = {
        "checkpoint": outcome.checkpoint,
        "arch": outcome.arch.to_json() if outcome.arch is not None else None,
        "format": result.format,
        "path": result.path,
        "spec_path": result.spec_path,
        "input_shape": list(result.input_shape),
        "opset": result.opset,
        "torchscript_method": result.method,
        "checked_on": result.device,
        "batch_sizes": list(result.batch_sizes),
        "max_abs_diff": result.max_abs_diff,
        "max_abs_diff_per_batch": {str(b): d for b, d in result.per_batch.items()},
        "tolerance": result.tolerance,
        "rtol": result.rtol,
        "passed": result.passed,
        "size_mb": round(result.size_mb, 6),
        "spatial_axes": result.spatial_axes,
        "max_abs_diff_per_size": result.per_size,
    }
    return json_document("export", body, seed=0)


def render(outcome: ExportOutcome, console: Console) -> None:
    result = outcome.exported
    table = Table(title=f"{escape(outcome.checkpoint)} → {escape(result.path)}  ·  {result.format}", title_justify="left")
    table.add_column("batch size", justify="right")
    table.add_column("max |export − PyTorch|", justify="right")
    table.add_column("tolerance", justify="right")
    for b, diff in result.per_batch.items():
        table.add_row(str(b), f"{diff:.2e}", f"{result.tolerance:.1e}")
    print_table(console, table)
    dynamic = " (batch axis dynamic)" if result.format != "safetensors" else ""
    details = [f"input {'×'.join(str(d) for d in result.input_shape)}{dynamic}", f"{result.size_mb:.2f} MB"]
    if result.opset is not None:
        details.append(f"opset {result.opset}, checked with onnxruntime")
    if result.method is not None:
        details.append(f"torch.jit.{result.method}, checked with torch.jit.load on {result.device}")
    if result.spec_path is not None:
        details.append(f"spec {escape(result.spec_path)}, checked by rebuilding without chanprune")
    mark = "[green]passed[/green]" if result.passed else "[red]FAILED[/red]"
    console.print(f"check      {mark}: " + "; ".join(details))
    if result.spatial_axes == "dynamic":
        sizes = ", ".join(f"{size} {diff:.2e}" for size, diff in result.per_size.items())
        console.print(f"spatial    height and width dynamic; also checked at {sizes} (batch 1, max |export − PyTorch|)")
