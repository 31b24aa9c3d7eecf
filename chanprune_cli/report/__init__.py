"""Rendering: rich tables for people, JSON documents for scripts.

Nothing here measures or loads anything: callers pass in plain numbers. The one exception is
reading module attributes (channels, kernel) to describe layers, which is presentation.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from torch import nn

from .. import __version__
from ..engine.layer_rules import layer_shape
from ..measure import model_size_bytes  # noqa: F401  (cli/analyze imports it from here)
from ..support.fsutil import write_text_atomic

if TYPE_CHECKING:
    from ..models import ArchSpec

SCHEMA_VERSION = 1
TOOL_NAME = "chanprune"



# --------------------------------------------------------------------------------------------
# formatting helpers


def human_count(n: float, unit: str = "") -> str:
    """1234567 -> '1.23 M'. Decimal prefixes, as papers quote params and MACs."""
    for factor, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "K")):
        if abs(n) >= factor:
            return f"{n / factor:.2f} {prefix}{unit}"
    return f"{n:.0f} {unit}".rstrip()


def print_table(console: Console, table: Table) -> None:
    """Print `table` under its title, which gets a line of its own wrapped at the console's width:
    rich wraps a table's own title at the table's width, breaking long file names mid-word above a
    narrow table."""
    title, table.title = table.title, None
    if title is not None:
        console.print(title, style=table.title_style or "table.title", overflow="fold")
    console.print(table)


def make_console(*, stderr: bool = False) -> Console:
    """A console bound to the current stdout/stderr (so test runners that swap them capture it)."""
    # Wider than rich's 80-column default when not on a terminal: tables in logs stay readable.
    probe = Console(stderr=stderr)
    width = None if probe.is_terminal else 120
    return Console(stderr=stderr, width=width, highlight=False)


# --------------------------------------------------------------------------------------------
# layer descriptions


@dataclass(frozen=True)
class LayerRow:
    """One channel-owning leaf module of a model, as the analyze table shows it."""

    name: str
    type: str
    in_channels: int | None
    out_channels: int | None
    kernel: tuple[int, ...] | None
    stride: tuple[int, ...] | None
    groups: int
    params: int
    macs: int

    def to_json(self, total_macs: int) -> dict[str, Any]:
        return {
            "name": self.name,
            "type": self.type,
            "in_channels": self.in_channels,
            "out_channels": self.out_channels,
            "kernel": list(self.kernel) if self.kernel is not None else None,
            "stride": list(self.stride) if self.stride is not None else None,
            "groups": self.groups,
            "params": self.params,
            "macs": self.macs,
            "macs_pct": _pct(self.macs, total_macs),
        }


def _pct(part: int, total: int) -> float:
    return round(100.0 * part / total, 4) if total else 0.0


def layer_rows(model: nn.Module, module_macs: dict[str, int]) -> list[LayerRow]:
    """Describe the conv / linear / norm leaf modules of `model` in definition order.

    `module_macs` maps leaf module names to MACs (measure.per_module_macs); missing names count 0.
    """
    rows: list[LayerRow] = []
    for name, module in model.named_modules():
        shape = layer_shape(module)  # the layer rules say which modules own channels
        if shape is None:
            continue
        params = sum(p.numel() for p in module.parameters(recurse=False))
        rows.append(LayerRow(name, type(module).__name__, shape.in_channels, shape.out_channels, shape.kernel,
                             shape.stride, shape.groups, params, int(module_macs.get(name, 0))))
    return rows


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


# --------------------------------------------------------------------------------------------
# JSON


def json_document(command: str, body: dict[str, Any], *, seed: int | None) -> dict[str, Any]:
    """Wrap a command's report with the fields every chanprune JSON document has."""
    return {
        "schema_version": SCHEMA_VERSION,
        "command": command,
        "tool": {"name": TOOL_NAME, "version": __version__},
        "torch_version": torch.__version__,
        "seed": seed,
        **body,
    }


def write_json(doc: dict[str, Any], path: str | Path) -> None:
    """Write `doc` to `path` atomically; `-` means stdout."""
    text = json.dumps(doc, indent=2, sort_keys=False) + "\n"
    if str(path) == "-":
        sys.stdout.write(text)
        sys.stdout.flush()
    else:
        write_text_atomic(path, text)


# --------------------------------------------------------------------------------------------
# run (the pipeline summary)


def render_run(results: list[Any], run_dir: Path, console: Console) -> None:
    table = Table(title=f"chanprune run: {escape(str(run_dir))}", title_justify="left")
    table.add_column("stage")
    table.add_column("status")
    table.add_column("s", justify="right")
    table.add_column("outputs", overflow="fold")
    for r in results:
        status = {"ran": "[green]ran[/green]", "failed": "[red]gates failed[/red]"}.get(r.status, "[dim]up to date[/dim]")
        table.add_row(r.name, status, "–" if r.status == "skipped" else f"{r.seconds:.1f}",
                      escape(", ".join(Path(p).name for p in r.outputs)))
    print_table(console, table)


def render_config(files: list[str], rows: dict[str, list[dict[str, Any]]], last: dict[str, Any], state_file: str,
                  console: Console) -> None:
    console.print("config files: " + (escape(" < ".join(files)) + "  (later wins; flags win over all)" if files
                                      else "none (no chanprune.toml or [tool.chanprune] found here or above)"))
    for command, entries in rows.items():
        if not entries:
            continue
        table = Table(title=f"chanprune {command}", title_justify="left")
        table.add_column("key")
        table.add_column("value", overflow="fold")
        table.add_column("from", overflow="fold")
        for e in entries:
            source = "[dim]default[/dim]" if e["source"] == "default" else escape(e["source"])
            table.add_row(e["key"], escape(json.dumps(e["value"])), source)
        print_table(console, table)
    if isinstance(last.get("score"), dict):
        s = last["score"]
        console.print(f"last score ({escape(state_file)}): {escape(str(s.get('checkpoint')))} "
                      f"({escape(str(s.get('criterion')))}) -> {escape(str(s.get('scores')))}")


# --------------------------------------------------------------------------------------------
# analyze


@dataclass
class AnalyzeReport:
    """Everything `chanprune analyze` shows, as plain data."""

    checkpoint: str
    source_format: str
    arch: ArchSpec | None
    input_shape: tuple[int, int, int]
    params: int
    macs: int
    size_bytes: int
    layers: list[LayerRow]
    seed: int | None = None
    accuracy: dict[str, Any] | None = None  # top1, top5 (0-100), images, data, max_batches
    groups: list[dict[str, Any]] | None = None  # group_rows(graph)

    @property
    def size_mb(self) -> float:
        return self.size_bytes / float(1 << 20)  # MiB, labelled MB as most tools do (measure.file_size_mb)


def analyze_document(report: AnalyzeReport) -> dict[str, Any]:
    """The JSON document of `chanprune analyze` (model.params, model.macs, accuracy.*)."""
    body: dict[str, Any] = {
        "checkpoint": {"path": report.checkpoint, "format": report.source_format},
        "arch": report.arch.to_json() if report.arch is not None else None,
        "input_shape": list(report.input_shape),
        "model": {"params": int(report.params), "macs": int(report.macs), "size_mb": round(report.size_mb, 6)},
        "layers": [row.to_json(report.macs) for row in report.layers],
    }
    if report.groups is not None:
        body["groups"] = report.groups
    if report.accuracy is not None:
        body["accuracy"] = dict(report.accuracy)
    return json_document("analyze", body, seed=report.seed)


def render_analyze(report: AnalyzeReport, console: Console) -> None:
    """The analyze report as a rich table of layers followed by totals."""
    arch = report.arch.name if report.arch is not None else "(pickled module)"
    shape = "×".join(str(d) for d in report.input_shape)
    table = Table(title=f"{report.checkpoint}  ·  {arch}  ·  input {shape}", title_justify="left", show_footer=True)
    table.add_column("layer", footer="total", overflow="fold")
    table.add_column("type")
    table.add_column("channels", justify="right")
    table.add_column("kernel", justify="right")
    table.add_column("params", justify="right", footer=f"{report.params:,}")
    table.add_column("MACs", justify="right", footer=human_count(report.macs))
    table.add_column("% MACs", justify="right", footer="100.0")
    for row in report.layers:
        table.add_row(
            row.name,
            row.type,
            _channels_text(row),
            _kernel_text(row),
            f"{row.params:,}",
            human_count(row.macs),
            f"{_pct(row.macs, report.macs):.1f}",
        )
    print_table(console, table)
    if report.groups is not None:
        render_groups(report.groups, console)
    console.print(f"params     {report.params:,} ({human_count(report.params)})")
    console.print(f"MACs       {report.macs:,} ({human_count(report.macs)}, fvcore, batch 1)")
    console.print(f"size       {report.size_mb:.2f} MB (parameters + buffers)")
    if report.accuracy is not None:
        acc = report.accuracy
        console.print(f"top-1      {acc['top1']:.2f} %")
        console.print(f"top-5      {acc['top5']:.2f} %")
        console.print(f"images     {acc['images']:,} ({acc.get('data', '')})")


# --------------------------------------------------------------------------------------------
# channel groups (analyze) and pruning (prune)


def group_rows(graph: Any) -> list[dict[str, Any]]:
    """The channel groups of a ChannelGraph as JSON-ready rows (analyze.groups[])."""
    return [
        {"name": g.name, "channels": g.channels, "prunable": g.prunable,
         "prunable_channels": len(g.prunable_classes) if g.prunable else 0,
         "reason": g.reason, "members": list(g.members),
         "approximate": sorted(set(g.approximate.values()))}  # why removing some is not exact (--through-layernorm)
        for g in graph.groups
    ]


def render_groups(groups: list[dict[str, Any]], console: Console) -> None:
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


@dataclass
class PruneReport:
    """Everything `chanprune prune` shows, as plain data."""

    checkpoint: str
    output: str
    criterion: str
    requested: dict[str, float]
    before: dict[str, int]
    after: dict[str, int]
    layers: list[dict[str, Any]]
    verify: dict[str, Any] | None
    blocked: list[dict[str, Any]]
    seed: int | None = None
    accuracy: dict[str, Any] | None = None  # before/after top-1 (and after BN recalibration)


def _reduction(before: int, after: int) -> float:
    return round(100.0 * (1 - after / before), 4) if before else 0.0


def prune_document(report: PruneReport) -> dict[str, Any]:
    """The JSON document of `chanprune prune`."""
    achieved = {"params_reduction_pct": _reduction(report.before["params"], report.after["params"]),
                "macs_reduction_pct": _reduction(report.before["macs"], report.after["macs"]),
                "channels_removed": sum(max(0, r["out_before"] - r["out_after"]) for r in report.layers)}
    body: dict[str, Any] = {
        "checkpoint": report.checkpoint,
        "output": report.output,
        "criterion": report.criterion,
        "requested": report.requested,
        "achieved": achieved,
        "before": report.before,
        "after": report.after,
        "verify": report.verify,
        "layers": report.layers,
        "blocked": report.blocked,
    }
    if report.accuracy is not None:
        body["accuracy"] = report.accuracy
    return json_document("prune", body, seed=report.seed)


def render_prune(report: PruneReport, console: Console) -> None:
    table = Table(title=f"{report.checkpoint} → {report.output}  ·  criterion {report.criterion}",
                  title_justify="left", show_footer=True)
    table.add_column("layer", footer="total", overflow="fold")
    table.add_column("channels", justify="right")
    table.add_column("params", justify="right", footer=f"{report.before['params']:,} → {report.after['params']:,}")
    table.add_column("MACs", justify="right", footer=f"{human_count(report.before['macs'])} → {human_count(report.after['macs'])}")
    for r in report.layers:
        changed = (r["in_before"], r["out_before"]) != (r["in_after"], r["out_after"])
        style = "" if changed else "dim"
        table.add_row(r["name"], f"{r['in_before']}→{r['out_before']}  ⇒  {r['in_after']}→{r['out_after']}",
                      f"{r['params_before']:,} → {r['params_after']:,}",
                      f"{human_count(r['macs_before'])} → {human_count(r['macs_after'])}", style=style)
    print_table(console, table)
    req = ", ".join(f"{k} {v:g}" for k, v in report.requested.items())
    console.print(f"requested  {req}")
    console.print(f"params     {report.before['params']:,} → {report.after['params']:,} "
                  f"(-{_reduction(report.before['params'], report.after['params']):.1f} %)")
    console.print(f"MACs       {human_count(report.before['macs'])} → {human_count(report.after['macs'])} "
                  f"(-{_reduction(report.before['macs'], report.after['macs']):.1f} %, fvcore)")
    if report.verify is None:
        console.print("verify     [yellow]skipped (--no-verify)[/yellow]")
    else:
        v = report.verify
        if v.get("approximate"):  # --through-layernorm removals: measured, not proven
            console.print(f"verify     [yellow]approximate (LayerNorm statistics changed)[/yellow]: max |pruned − masked| = "
                          f"{v['max_abs_diff']:.2e} (relative {v['relative_diff']:.2e}, float64), not a proof")
        else:
            mark = "[green]passed[/green]" if v["passed"] else "[red]FAILED[/red]"
            console.print(f"verify     {mark}: max |pruned − masked original| = {v['max_abs_diff']:.2e} (tolerance {v['tolerance']:.1e}, float64)")
    if report.blocked:
        console.print(f"blocked    {len(report.blocked)} group(s) kept whole: "
                      + "; ".join(f"{b['name']} ({b['reason']})" for b in report.blocked[:4])
                      + (" …" if len(report.blocked) > 4 else ""))
    if report.accuracy is not None:
        labels = {"top1_before": "before", "top1_pruned": "pruned", "top1_recalibrated": "pruned + BN recalibration"}
        shown = [f"{labels[k]} {v:.2f} %" for k, v in report.accuracy.items() if k in labels]
        if shown:
            console.print("top-1      " + " → ".join(shown))
        if report.accuracy.get("recalibrated_bn_batches"):
            console.print(f"BN stats   re-estimated on {report.accuracy['recalibrated_bn_batches']} batches of --data")


def score_document(checkpoint: str, output: str, criterion: str, ratio: float, rows: list[dict[str, Any]],
                   data: dict[str, Any] | None, seed: int | None) -> dict[str, Any]:
    body = {"checkpoint": checkpoint, "output": output, "criterion": criterion, "data": data,
            "summary_ratio": ratio, "groups": rows}
    return json_document("score", body, seed=seed)


def render_scores(criterion: str, output: str, ratio: float, rows: list[dict[str, Any]], console: Console) -> None:
    table = Table(title=f"{criterion} scores → {output}", title_justify="left")
    table.add_column("group", overflow="fold")
    table.add_column("channels", justify="right")
    table.add_column("min", justify="right")
    table.add_column("median", justify="right")
    table.add_column("max", justify="right")
    table.add_column(f"removed at --ratio {ratio:g}", justify="right")
    for r in rows:
        table.add_row(r["group"], str(r["channels"]), f"{r['min']:.3g}", f"{r['median']:.3g}", f"{r['max']:.3g}",
                      str(r["removed_at_ratio"]))
    print_table(console, table)


# --------------------------------------------------------------------------------------------
# bench


@dataclass
class BenchReport:
    """Everything `chanprune bench` shows, as plain data (benchmark.py's results, reference first)."""

    models: list[Any]  # benchmark.ModelResult
    comparisons: list[Any]  # benchmark.Comparison, one per model (the reference's own is 1× / ±0)
    gates: list[Any]  # benchmark.Gate
    device: str
    threads: int | None
    batch_sizes: list[int]
    timing: dict[str, Any]  # warmup, repeats, max_time_s (as requested; each latency entry says what was done)
    gate_batch: int | None = None
    data: dict[str, Any] | None = None  # source, max_batches
    seed: int | None = None
    plot: str | None = None
    warnings: list[str] = field(default_factory=list)  # e.g. benchmark.slowdowns()


def bench_document(report: BenchReport) -> dict[str, Any]:
    """The JSON document of `chanprune bench` (models[].path/params/macs/latency_ms/accuracy, gates[])."""
    body: dict[str, Any] = {
        "reference": report.models[0].path if report.models else None,
        "device": report.device,
        "threads": report.threads,
        "batch_sizes": list(report.batch_sizes),
        "timing": dict(report.timing),
        "gate_batch": report.gate_batch,
        "data": report.data,
        "models": [{**m.to_json(), "vs_reference": c.to_json()} for m, c in zip(report.models, report.comparisons)],
        "gates": [g.to_json() for g in report.gates],
        "passed": all(g.passed for g in report.gates),
        "plot": report.plot,
        "warnings": list(report.warnings),
    }
    return json_document("bench", body, seed=report.seed)


def model_labels(paths: list[str]) -> list[str]:
    """File names when they tell the models apart, else the paths as given."""
    names = [Path(p).name for p in paths]
    return names if len(set(names)) == len(names) else list(paths)


def _rate(value: float) -> str:
    return f"{value:,.0f}" if value >= 100 else f"{value:.3g}"


def _times(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}×"


def render_bench(report: BenchReport, console: Console) -> None:
    """Two tables (models; latency per batch size) and the gates."""
    from rich.markup import escape

    if not report.models:
        return
    ref = report.models[0]
    shape = "×".join(str(d) for d in ref.input_shape)
    threads = (f", {report.threads} thread{'' if report.threads == 1 else 's'}"
               if report.threads is not None and report.device == "cpu" else "")
    has_acc = any(m.accuracy is not None for m in report.models)
    labels = [escape(label) for label in model_labels([m.path for m in report.models])]
    table = Table(title=f"models  ·  input {shape}  ·  first = reference", title_justify="left")
    table.add_column("model", overflow="fold")
    table.add_column("params", justify="right")
    table.add_column("MACs", justify="right")
    table.add_column("MACs ratio", justify="right")
    table.add_column("file MB", justify="right")
    if has_acc:
        table.add_column("top-1 %", justify="right")
        table.add_column("Δ top-1", justify="right")
        table.add_column("top-5 %", justify="right")
    for i, (m, c) in enumerate(zip(report.models, report.comparisons)):
        cells = [labels[i] + (" (ref)" if i == 0 else ""), f"{m.params:,}", human_count(m.macs),
                 "1.00×" if i == 0 else _times(c.macs_ratio), f"{m.file_size_mb:.2f}"]
        if has_acc:
            acc = m.accuracy
            change = "ref" if i == 0 else ("-" if c.top1_change is None else f"{c.top1_change:+.2f}")
            cells += ["-" if acc is None else f"{acc['top1']:.2f}", change, "-" if acc is None else f"{acc['top5']:.2f}"]
        table.add_row(*cells)
    print_table(console, table)

    timing = report.timing
    where = f"{report.device} ({escape(str(timing['device_name']))})" if timing.get("device_name") else report.device
    settings = [timing.get("dtype", "fp32")] + [label for key, label in (
        ("channels_last", "channels-last"), ("cudnn_benchmark", "cuDNN autotuned"), ("compile", "torch.compile"))
        if timing.get(key)]
    lat = Table(title=f"latency on {where}{threads}  ·  {', '.join(settings)}  ·  median (p90) of timed runs after warm-up",
                title_justify="left")
    lat.add_column("model", overflow="fold")
    lat.add_column("batch", justify="right")
    lat.add_column("median ms", justify="right")
    lat.add_column("p90 ms", justify="right")
    lat.add_column("images/s", justify="right")
    lat.add_column("runs", justify="right")
    lat.add_column("speed-up", justify="right")
    lat.add_column("MACs ratio", justify="right")
    lat.add_column("speed-up ÷ MACs ratio", justify="right")
    for i, (m, c) in enumerate(zip(report.models, report.comparisons)):
        for b in sorted(m.latency):
            r = m.latency[b]
            ref_row = i == 0
            efficiency = c.speedup_vs_macs_ratio(b)
            lat.add_row(labels[i] if b == min(m.latency) else "", str(b), f"{r['median_ms']:.2f}", f"{r['p90_ms']:.2f}",
                        _rate(r["throughput_ips"]), str(r["repeats"]),
                        "ref" if ref_row else _times(c.speedup.get(b)),
                        "ref" if ref_row else _times(c.macs_ratio),
                        "ref" if ref_row or efficiency is None else f"{100 * efficiency:.0f} %",
                        end_section=b == max(m.latency))
    print_table(console, lat)
    if len(report.models) > 1:
        console.print("speed-up = reference median / model median; MACs ratio = reference MACs / model MACs "
                      "(the speed-up the MACs alone predict); 100 % = as much faster as the work removed")
    for g in report.gates:
        mark = "[green]passed[/green]" if g.passed else "[red]FAILED[/red]"
        console.print(f"gate       {mark}  {escape(g.describe())}")
    if report.plot:
        console.print(f"plot       {escape(report.plot)}")


# --------------------------------------------------------------------------------------------
# export


def export_document(checkpoint: str, result: Any, *, arch: ArchSpec | None) -> dict[str, Any]:
    """The JSON document of `chanprune export` (`result`: an export.ExportResult)."""
    body: dict[str, Any] = {
        "checkpoint": checkpoint,
        "arch": arch.to_json() if arch is not None else None,
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
    }
    return json_document("export", body, seed=0)


def render_export(checkpoint: str, result: Any, console: Console) -> None:
    from rich.markup import escape

    table = Table(title=f"{escape(checkpoint)} → {escape(result.path)}  ·  {result.format}", title_justify="left")
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
