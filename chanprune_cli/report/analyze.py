"""`chanprune analyze`'s report: the layer table, the channel groups, totals and accuracy; its JSON
document; and the list of built-in architectures (`--list-archs`)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.table import Table

from ..support.console import make_console
from .common import human_count, json_document, print_table, publish

if TYPE_CHECKING:
    from ..prune.describe import LayerRow
    from ..recipes.analyze import AnalyzeResult


def show(result: AnalyzeResult, json_report: str | None) -> None:
    publish(lambda console: render(result, console), lambda: document(result), json_report)


def document(result: AnalyzeResult) -> dict[str, Any]:
    """The JSON document of `chanprune analyze` (model.params, model.macs, accuracy.*)."""
    body: dict[str, Any] = {
        "checkpoint": {"path": result.checkpoint, "format": result.source_format},
        "arch": result.arch.to_json() if result.arch is not None else None,
        "input_shape": list(result.input_shape),
        "model": {"params": int(result.params), "macs": int(result.macs), "size_mb": round(result.size_mb, 6)},
        "layers": [_layer_json(row, result.macs) for row in result.layers],
    }
    if result.groups is not None:
        body["groups"] = result.groups
    if result.accuracy is not None:
        body["accuracy"] = dict(result.accuracy)
    body["warnings"] = list(result.warnings)
    return json_document("analyze", body, seed=result.seed)


def _layer_json(row: LayerRow, total_macs: int) -> dict[str, Any]:
    return {
        "name": row.name,
        "type": row.type,
        "in_channels": row.in_channels,
        "out_channels": row.out_channels,
        "kernel": list(row.kernel) if row.kernel is not None else None,
        "stride": list(row.stride) if row.stride is not None else None,
        "groups": row.groups,
        "params": row.params,
        "macs": row.macs,
        "macs_pct": _pct(row.macs, total_macs),
    }


def _pct(part: int, total: int) -> float:
    return round(100.0 * part / total, 4) if total else 0.0


def render(result: AnalyzeResult, console: Console) -> None:
    """The layers as a rich table followed by the channel groups and totals."""
    arch = result.arch.name if result.arch is not None else "(pickled module)"
    shape = "×".join(str(d) for d in result.input_shape)
    table = Table(title=f"{result.checkpoint}  ·  {arch}  ·  input {shape}", title_justify="left", show_footer=True)
    table.add_column("layer", footer="total", overflow="fold")
    table.add_column("type")
    table.add_column("channels", justify="right")
    table.add_column("kernel", justify="right")
    table.add_column("params", justify="right", footer=f"{result.params:,}")
    table.add_column("MACs", justify="right", footer=human_count(result.macs))
    table.add_column("% MACs", justify="right", footer="100.0")
    for row in result.layers:
        table.add_row(row.name, row.type, _channels_text(row), _kernel_text(row), f"{row.params:,}",
                      human_count(row.macs), f"{_pct(row.macs, result.macs):.1f}")
    print_table(console, table)
    if result.groups is not None:
        _render_groups(result.groups, console)
    console.print(f"params     {result.params:,} ({human_count(result.params)})")
    console.print(f"MACs       {result.macs:,} ({human_count(result.macs)}, fvcore, batch 1)")
    console.print(f"size       {result.size_mb:.2f} MB (parameters + buffers)")
    if result.accuracy is not None:
        acc = result.accuracy
        console.print(f"top-1      {acc['top1']:.2f} %")
        console.print(f"top-5      {acc['top5']:.2f} %")
        console.print(f"images     {acc['images']:,} ({acc.get('data', '')})")
        norm = acc.get("normalization")
        if norm is not None:
            values = ", ".join(f"{name} {','.join(f'{v:g}' for v in norm[name])}" for name in ("mean", "std"))
            console.print(f"inputs     (x - mean) / std with {values}")


def _kernel_text(row: LayerRow) -> str:
    if row.kernel is None:
        return "-"
    text = "×".join(str(k) for k in row.kernel)
    if row.stride and any(s != 1 for s in row.stride):
        text += f" /{row.stride[0]}" if len(set(row.stride)) == 1 else f" /{'×'.join(map(str, row.stride))}"
    if row.groups > 1:
        text += f" g{row.groups}"
    return text


def _channels_text(row: LayerRow) -> str:
    if row.in_channels is None and row.out_channels is None:
        return "-"
    if row.in_channels == row.out_channels and row.kernel is None and row.type != "Linear":
        return str(row.out_channels)  # norms: one channel count
    return f"{row.in_channels}→{row.out_channels}"


def _render_groups(groups: list[dict[str, Any]], console: Console) -> None:
    table = Table(title="channel groups (coupled channels are removed together)", title_justify="left")
    table.add_column("group", overflow="fold")
    table.add_column("channels", justify="right")
    table.add_column("layers", justify="right")
    table.add_column("prunable")
    table.add_column("why not / what stays", overflow="fold")
    for g in groups:
        approximate = g["prunable"] and g.get("approximate")
        status = "[yellow]approximate[/yellow]" if approximate else "[green]yes[/green]" if g["prunable"] else "[red]blocked[/red]"
        table.add_row(g["name"], str(g["channels"]), str(len(g["members"])), status,
                      g["reason"] or ("; ".join(g["approximate"]) if approximate else ""))
    print_table(console, table)
    prunable = sum(1 for g in groups if g["prunable"])
    console.print(f"groups     {prunable} of {len(groups)} prunable")


def show_archs() -> None:
    """The built-in architectures (`analyze --list-archs`)."""
    from ..models import builtin_archs

    table = Table(title="built-in architectures (--arch NAME)", title_justify="left")
    table.add_column("name")
    table.add_column("description")
    for name, description in builtin_archs().items():
        table.add_row(name, description)
    console = make_console()
    console.print(table)
    console.print("Also: [b]torchvision:NAME[/b] (any torchvision classification model), [b]timm:NAME[/b] (any timm "
                  "model; needs timm) and [b]package.module:factory[/b] (your own model, importable from the working "
                  "directory).")
