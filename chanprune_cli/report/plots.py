"""The `--plot` figures: `chanprune bench`'s (one image instead of two tables) and `chanprune
prune`'s latency staircases (`write_latency_staircases`).

Top: every layer's channel width before (the reference, or for a single pruned chanprune file its
unpruned architecture) and after pruning. With several models, below it: top-1 vs MACs (with
`--data`) and latency vs MACs per batch size, with the latency MACs alone would predict (the
reference's, scaled by MACs) as a dashed line: the gap to it is what pruning could still gain.

matplotlib is optional (`pip install 'chanprune[plot]'`): imported lazily, drawn with the Agg
canvas (no display, no pyplot global state). The bench recipe checks `--plot` before measuring
anything (`recipes.bench.check_plot`).
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..recipes.bench import check_plot

if TYPE_CHECKING:
    from ..recipes.bench import BenchResult

_BEFORE = "#c8c8c8"
_COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf")


def write_bench_plot(report: BenchResult, path: str | os.PathLike[str]) -> None:
    """Draw the bench figure and write it atomically to `path` (.png, .svg or .pdf)."""
    check_plot(path)
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from ..support.fsutil import atomic_path
    from .bench import model_labels

    models = report.models
    labels = model_labels([m.path for m in models])
    multi = len(models) > 1
    has_acc = multi and sum(m.accuracy is not None for m in models) > 0
    fig = Figure(figsize=(13, 9.5 if multi else 5.2), layout="constrained")
    FigureCanvasAgg(fig)
    shape = "×".join(str(d) for d in models[0].input_shape)
    threads = (f", {report.threads} thread{'' if report.threads == 1 else 's'}"
               if report.threads is not None and report.device == "cpu" else "")
    fig.suptitle(f"chanprune bench  ·  {report.device}{threads}  ·  input {shape}", fontsize=12)
    if multi:
        grid = fig.add_gridspec(2, 2 if has_acc else 1, height_ratios=(1.15, 1))
        _widths(fig.add_subplot(grid[0, :]), report, labels)
        if has_acc:
            _accuracy(fig.add_subplot(grid[1, 0]), report, labels)
        _latency(fig.add_subplot(grid[1, 1 if has_acc else 0]), report, labels)
    else:
        _widths(fig.add_subplot(1, 1, 1), report, labels)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format=Path(path).suffix.lower().lstrip("."), dpi=120)


def _widths(ax: Any, report: BenchResult, labels: list[str]) -> None:
    models = report.models
    ref = models[0]
    if len(models) > 1:
        before, before_label = ref.widths, f"{labels[0]} (reference)"
        after = [(label, m.widths) for label, m in zip(labels[1:], models[1:])]
    elif ref.original_widths:
        before, before_label = ref.original_widths, "unpruned architecture"
        after = [(labels[0], ref.widths)]
    else:
        before, before_label, after = ref.widths, labels[0], []
    names = list(before)
    x = list(range(len(names)))
    ax.bar(x, [before[n] for n in names], width=0.85, color=_BEFORE, label=before_label, zorder=1)
    if len(after) == 1:
        label, widths = after[0]
        ax.bar(x, [widths.get(n, math.nan) for n in names], width=0.5, color=_COLORS[0], label=label, zorder=2)
    else:
        for i, (label, widths) in enumerate(after):
            # Dashed lines for later models, so that identical widths still show both colours.
            ax.plot(x, [widths.get(n, math.nan) for n in names], drawstyle="steps-mid", marker="o", markersize=2.5,
                    linewidth=1.2, linestyle=("-", "--", "-.", ":")[i % 4], color=_COLORS[i % len(_COLORS)],
                    label=label, zorder=2 + i)
    kept = ""
    if after:
        total = sum(before.values())
        shares = [f"{label}: {100 * sum(w.get(n, 0) for n in names) / total:.0f} %" for label, w in after] if total else []
        kept = "  ·  channels kept " + ", ".join(shares)
    ax.set_title(("channel widths per layer, before (grey) and after" if after else "channel widths per layer") + kept,
                 fontsize=10, loc="left")
    ax.set_ylabel("output channels")
    step = max(1, math.ceil(len(names) / 90))
    ax.set_xticks(x[::step])
    ax.set_xticklabels(names[::step], rotation=90, fontsize=6 if len(names) > 30 else 8)
    ax.set_xlim(-0.6, len(names) - 0.4)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, loc="upper left")


def _annotate(ax: Any, x: float, y: float, text: str) -> None:
    ax.annotate(text, (x, y), textcoords="offset points", xytext=(5, 4), fontsize=7)


def _accuracy(ax: Any, report: BenchResult, labels: list[str]) -> None:
    for i, (m, label) in enumerate(zip(report.models, labels)):
        if m.accuracy is None:
            continue
        ax.scatter([m.macs / 1e6], [m.accuracy["top1"]], marker="*" if i == 0 else "o", s=120 if i == 0 else 40,
                   color=_COLORS[i % len(_COLORS)], zorder=3)
        _annotate(ax, m.macs / 1e6, m.accuracy["top1"], label + (" (ref)" if i == 0 else ""))
    ref_acc = report.models[0].accuracy
    for limit in {g.limit for g in report.gates if g.name == "max-acc-drop"}:
        if ref_acc is not None:
            ax.axhline(ref_acc["top1"] - limit, linestyle=":", color="grey", linewidth=1, label=f"--max-acc-drop {limit:g}")
            ax.legend(fontsize=7, loc="best")
    ax.set_title("top-1 accuracy vs MACs", fontsize=10, loc="left")
    ax.set_xlabel("MACs (millions, batch 1)")
    ax.set_ylabel("top-1 %")
    ax.grid(alpha=0.3)


def _latency(ax: Any, report: BenchResult, labels: list[str]) -> None:
    """Median latency relative to the reference's at the same batch size, against MACs; the dashed
    diagonal is latency proportional to MACs (what the removed work alone would give)."""
    models = report.models
    ref = models[0]
    if not ref.macs:
        return
    xs = [m.macs / 1e6 for m in models]
    hi = max(xs) * 1.12
    ax.plot([0, hi], [0, hi / (ref.macs / 1e6)], linestyle="--", linewidth=1, color="black", alpha=0.6,
            label="proportional to MACs")
    for j, b in enumerate(sorted(report.batch_sizes)):
        if b not in ref.latency:
            continue
        base = ref.latency[b]["median_ms"]
        points = [(m.macs / 1e6, m.latency[b]["median_ms"] / base, label)
                  for m, label in zip(models, labels) if b in m.latency]
        ax.plot([p[0] for p in points], [p[1] for p in points], "o", color=_COLORS[j % len(_COLORS)], markersize=6,
                label=f"batch {b} ({base:.3g} ms for the reference)", zorder=3)
        if b == max(report.batch_sizes):
            for x, y, label in points:
                _annotate(ax, x, y, label)
    limits = {g.limit for g in report.gates if g.name == "min-speedup"}
    for limit in limits:
        ax.axhline(1 / limit, linestyle=":", color="grey", linewidth=1,
                   label=f"--min-speedup {limit:g} (at batch {report.gate_batch})")
    ax.set_xlim(0, hi)
    ax.set_ylim(bottom=0)
    ax.set_title("median latency relative to the reference vs MACs", fontsize=10, loc="left")
    ax.set_xlabel("MACs (millions, batch 1)")
    ax.set_ylabel("latency / reference latency")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")


def write_latency_staircases(curves: list[dict[str, Any]], title: str, path: str | os.PathLike[str]) -> None:
    """`chanprune prune --plot`: the latency of each costly group's layers vs its kept width (the
    staircase of the target's tables), with the plan's width marked; one panel per group."""
    check_plot(path)
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from ..support.fsutil import atomic_path

    columns = min(3, max(1, len(curves)))
    rows = max(1, math.ceil(len(curves) / columns))
    fig = Figure(figsize=(4.3 * columns, 3.2 * rows + 0.6), layout="constrained")
    FigureCanvasAgg(fig)
    fig.suptitle(title, fontsize=11)
    for i, curve in enumerate(curves):
        ax = fig.add_subplot(rows, columns, i + 1)
        widths, ms = curve["widths"], curve["ms"]
        ax.step(widths, ms, where="post", color=_COLORS[0], linewidth=1.2)
        kept = curve["kept"]
        at = ms[widths.index(kept)] if kept in widths else None
        ax.axvline(kept, color=_COLORS[1], linestyle="--", linewidth=1)
        if at is not None:
            ax.plot([kept], [at], "o", color=_COLORS[1])
        ax.set_title(f"{curve['group']}: {kept} of {widths[0]} kept", fontsize=9)
        ax.set_xlabel("channels kept")
        ax.set_ylabel("ms (its layers)")
        ax.grid(alpha=0.3)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format=Path(path).suffix.lower().lstrip("."), dpi=120)
