"""`chanprune bench`'s report: the models side by side, latency per batch size and the gates; its
JSON document and (`--plot`) its figure (plots.py)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.markup import escape

from .common import human_count, json_document, names_and_numbers, print_table, publish

if TYPE_CHECKING:
    from ..recipes.bench import BenchResult


def show(result: BenchResult, json_report: str | None) -> None:
    """The tables, the JSON document and the figure: every output is written before the command
    fails on a gate, so CI keeps the artifacts."""
    publish(lambda console: render(result, console), lambda: document(result), json_report)
    if result.plot is not None:
        from .plots import write_bench_plot

        write_bench_plot(result, result.plot)


def document(result: BenchResult) -> dict[str, Any]:
    """The JSON document of `chanprune bench` (models[].path/params/macs/latency_ms/accuracy, gates[])."""
    body: dict[str, Any] = {
        "reference": result.models[0].path if result.models else None,
        "device": result.device,
        "threads": result.threads,
        "batch_sizes": list(result.batch_sizes),
        "timing": dict(result.timing),
        "gate_batch": result.gate_batch,
        "data": result.data,
        "models": [{**m.to_json(), "vs_reference": c.to_json()} for m, c in zip(result.models, result.comparisons)],
        "gates": [g.to_json() for g in result.gates],
        "passed": all(g.passed for g in result.gates),
        "plot": result.plot,
        "warnings": list(result.warnings),
    }
    return json_document("bench", body, seed=result.seed)


def model_labels(paths: list[str]) -> list[str]:
    """File names when they tell the models apart, else the paths as given."""
    names = [Path(p).name for p in paths]
    return names if len(set(names)) == len(names) else list(paths)


def _rate(value: float) -> str:
    return f"{value:,.0f}" if value >= 100 else f"{value:.3g}"


def _times(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}×"


def render(result: BenchResult, console: Console) -> None:
    """Two tables (models; latency per batch size) and the gates."""
    if not result.models:
        return
    ref = result.models[0]
    shape = "×".join(str(d) for d in ref.input_shape)
    threads = (f", {result.threads} thread{'' if result.threads == 1 else 's'}"
               if result.threads is not None and result.device == "cpu" else "")
    has_acc = any(m.accuracy is not None for m in result.models)
    labels = [escape(label) for label in model_labels([m.path for m in result.models])]
    table = names_and_numbers(f"models  ·  input {shape}  ·  first = reference", "model", "params", "MACs", "MACs ratio",
                              "file MB", *(("top-1 %", "Δ top-1", "top-5 %") if has_acc else ()))
    for i, (m, c) in enumerate(zip(result.models, result.comparisons)):
        cells = [labels[i] + (" (ref)" if i == 0 else ""), f"{m.params:,}", human_count(m.macs),
                 "1.00×" if i == 0 else _times(c.macs_ratio), f"{m.file_size_mb:.2f}"]
        if has_acc:
            acc = m.accuracy
            change = "ref" if i == 0 else ("-" if c.top1_change is None else f"{c.top1_change:+.2f}")
            cells += ["-" if acc is None else f"{acc['top1']:.2f}", change, "-" if acc is None else f"{acc['top5']:.2f}"]
        table.add_row(*cells)
    print_table(console, table)

    timing = result.timing
    where = f"{result.device} ({escape(str(timing['device_name']))})" if timing.get("device_name") else result.device
    runtime = [] if timing.get("runtime", "torch") == "torch" else [str(timing["runtime"])]
    settings = runtime + [timing.get("dtype", "fp32")] + [label for key, label in (
        ("channels_last", "channels-last"), ("cudnn_benchmark", "cuDNN autotuned"), ("compile", "torch.compile"))
        if timing.get(key)]
    lat = names_and_numbers(f"latency on {where}{threads}  ·  {', '.join(settings)}  ·  median (p90) of runs timed round "
                            "by round after warm-up", "model", "batch", "median ms", "p90 ms", "images/s", "runs", "speed-up", "MACs ratio",
                            "speed-up ÷ MACs ratio")
    for i, (m, c) in enumerate(zip(result.models, result.comparisons)):
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
    if len(result.models) > 1:
        console.print("speed-up = reference median / model median; MACs ratio = reference MACs / model MACs "
                      "(the speed-up the MACs alone predict); 100 % = as much faster as the work removed")
    for g in result.gates:
        mark = "[green]passed[/green]" if g.passed else "[red]FAILED[/red]"
        console.print(f"gate       {mark}  {escape(g.describe())}")
    if result.plot:
        console.print(f"plot       {escape(result.plot)}")
