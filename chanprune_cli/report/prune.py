"""`chanprune prune`'s report: per-layer widths, params and MACs before and after, the
verification, blocked groups, accuracy and latency on the target; its JSON document; and
(`--plot`) the latency staircases of the costliest groups (plots.py)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from .common import human_count, json_document, print_table, publish

if TYPE_CHECKING:
    from ..recipes.prune import PruneResult

_DRY_RUN = "(dry run: nothing written)"


def show(result: PruneResult, json_report: str | None) -> None:
    publish(lambda console: render(result, console), lambda: document(result), json_report)
    if result.plot is not None and result.staircases is not None:
        from .plots import write_latency_staircases

        latency = result.latency or {}
        write_latency_staircases(result.staircases, f"chanprune prune  ·  {result.checkpoint}  ·  {latency.get('runtime')} "
                                 f"on {latency.get('device')}, batch {latency.get('batch')}", result.plot)


def _reduction(before: int, after: int) -> float:
    return round(100.0 * (1 - after / before), 4) if before else 0.0


def _change(before: int, after: int) -> str:
    """The change from `before` to `after` in percent with one sign: "-6.9 %", "+64.4 %"."""
    return f"{-_reduction(before, after):+.1f} %"


def document(result: PruneResult) -> dict[str, Any]:
    """The JSON document of `chanprune prune`."""
    before, after = result.before, result.after
    achieved = {"params_reduction_pct": _reduction(before["params"], after["params"]),
                "macs_reduction_pct": _reduction(before["macs"], after["macs"]),
                "channels_removed": sum(max(0, r["out_before"] - r["out_after"]) for r in result.layers)}
    body: dict[str, Any] = {
        "checkpoint": result.checkpoint,
        "output": result.output,
        "criterion": result.criterion.name,
        "requested": result.requested,
        "achieved": achieved,
        "before": before,
        "after": after,
        "verify": result.verify,
        "layers": result.layers,
        "blocked": result.blocked,
    }
    if result.accuracy is not None:
        body["accuracy"] = result.accuracy
    body.update({
        "dry_run": result.dry_run,
        "layer_ratio": result.layer_ratio,
        "criterion_options": result.criterion.recorded_options,
        "normalize": result.normalize,
        "rounds": result.rounds,
        "approximations": result.approximations,
        "macs_workload": result.macs_workload,  # null unless the MACs depend on the input
        "latency": result.latency,
        "warnings": result.warnings,
        "target_missed": result.target_missed,
        "plot": result.plot,
    })
    return json_document("prune", body, seed=result.seed)


def render(result: PruneResult, console: Console) -> None:
    before, after = result.before, result.after
    table = Table(title=f"{result.checkpoint} → {result.output or _DRY_RUN}  ·  criterion {result.criterion.name}",
                  title_justify="left", show_footer=True)
    table.add_column("layer", footer="total", overflow="fold")
    table.add_column("channels", justify="right")
    table.add_column("params", justify="right", footer=f"{before['params']:,} → {after['params']:,}")
    table.add_column("MACs", justify="right", footer=f"{human_count(before['macs'])} → {human_count(after['macs'])}")
    for r in result.layers:
        changed = (r["in_before"], r["out_before"]) != (r["in_after"], r["out_after"])
        table.add_row(r["name"], f"{r['in_before']}→{r['out_before']}  ⇒  {r['in_after']}→{r['out_after']}",
                      f"{r['params_before']:,} → {r['params_after']:,}",
                      f"{human_count(r['macs_before'])} → {human_count(r['macs_after'])}", style="" if changed else "dim")
    print_table(console, table)
    console.print(f"requested  {', '.join(f'{k} {v:g}' for k, v in result.requested.items())}")
    console.print(f"params     {before['params']:,} → {after['params']:,} ({_change(before['params'], after['params'])})")
    workload = result.macs_workload
    statement = f", {escape(workload['statement'])}" if workload is not None else ""
    console.print(f"MACs       {human_count(before['macs'])} → {human_count(after['macs'])} "
                  f"({_change(before['macs'], after['macs'])}, fvcore{statement})")
    if workload is not None:
        own = f"{workload['own_proposals']} proposals, " if workload.get("own_proposals") is not None else ""
        own += f"{workload['own_detections']} detections, " if workload.get("own_detections") is not None else ""
        console.print(f"[dim]note       on its own workload ({own}as the example input drives it) the pruned model "
                      f"counts {human_count(workload['own_macs_after'])} "
                      f"({_change(before['macs'], workload['own_macs_after'])}); not comparable with the line above[/dim]")
    if result.target_missed is not None:
        console.print(f"[yellow]target     {escape(result.target_missed)}[/yellow]")
    _render_verify(result.verify, console)
    if result.latency is not None:
        _render_latency(result.latency, console)
    if result.blocked:
        console.print(f"blocked    {len(result.blocked)} group(s) kept whole: "
                      + "; ".join(f"{b['name']} ({b['reason']})" for b in result.blocked[:4])
                      + (" …" if len(result.blocked) > 4 else ""))
    if result.accuracy is not None:
        _render_accuracy(result.accuracy, console)
    if result.layer_ratio is not None:
        groups = result.layer_ratio["groups"]
        console.print("by layer   " + ", ".join(f"{escape(glob)} {r:g}" for glob, r in result.layer_ratio["patterns"].items())
                      + f" ({len(groups)} group(s) matched)")
    if result.accuracy is not None and "val_images" in result.accuracy:
        console.print(f"val images {result.accuracy['val_images']:,} of --val-data (--val-images, drawn with --seed)")
    if result.plot is not None and result.staircases is not None:
        console.print(f"plot       {escape(result.plot)}")
    if result.dry_run:
        console.print("dry run    nothing written (no --out file, no .chanprune/last.json entry)")


def _render_latency(latency: dict[str, Any], console: Console) -> None:
    cpu = str(latency["device"]).startswith("cpu")
    threads = f", {latency['threads']} thread{'' if latency['threads'] == 1 else 's'}" if cpu else ""
    predicted = f"; predicted {latency['predicted_ms']:.3g} ms" if latency.get("predicted_ms") is not None else ""
    target = f"; target {latency['target_ratio']:.3g}" if latency.get("target_ratio") is not None else ""
    ratio = latency["ratio"]
    mark = "[red]slower[/red]" if ratio is not None and ratio > 1 else f"{ratio:.3f} of the original"
    console.print(f"latency    {latency['before_ms']:.3g} → {latency['after_ms']:.3g} ms ({mark}{target}{predicted}) on "
                  f"{latency['runtime']}, {escape(str(latency['device']))}, batch {latency['batch']}{threads}, "
                  f"{latency['dtype']}")


def _render_verify(verify: dict[str, Any] | None, console: Console) -> None:
    if verify is None:
        console.print("verify     [yellow]skipped (--no-verify)[/yellow]")
    elif verify.get("approximate"):  # --through-layernorm removals: measured, not proven
        console.print(f"verify     [yellow]approximate (LayerNorm statistics changed)[/yellow]: max |pruned − masked| = "
                      f"{verify['max_abs_diff']:.2e} (relative {verify['relative_diff']:.2e}, float64), not a proof")
    else:
        mark = "[green]passed[/green]" if verify["passed"] else "[red]FAILED[/red]"
        console.print(f"verify     {mark}: max |pruned − masked original| = {verify['max_abs_diff']:.2e} "
                      f"(tolerance {verify['tolerance']:.1e}, float64)")
        if verify.get("outputs") is not None:
            layers = verify.get("layers_compared") or 0
            proof = (f"the proof is the {layers} layer outputs compared one by one on the same input" if layers else
                     "[yellow]no layer output was compared: this proves nothing[/yellow]")
            console.print(f"           the model's outputs were {verify['outputs']} on the random input "
                          f"(no detections); {proof}")


def _render_accuracy(accuracy: dict[str, Any], console: Console) -> None:
    labels = {"top1_before": "before", "top1_pruned": "pruned", "top1_recalibrated": "pruned + BN recalibration"}
    shown = [f"{labels[k]} {v:.2f} %" for k, v in accuracy.items() if k in labels]
    if shown:
        console.print("top-1      " + " → ".join(shown))
    if accuracy.get("recalibrated_bn_batches"):
        console.print(f"BN stats   re-estimated on {accuracy['recalibrated_bn_batches']} batches of --data")
