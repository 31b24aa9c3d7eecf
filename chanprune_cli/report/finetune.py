"""`chanprune finetune`'s report: the validations, steps, throughput, the size change of a
pruning schedule, the final accuracy (label-free distillation: the teacher gap before and after)
and the saved files; and its JSON document."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.table import Table

from .common import human_count, json_document, publish

if TYPE_CHECKING:
    from ..recipes.finetune import FinetuneResult


def show(result: FinetuneResult, json_report: str | None) -> None:
    publish(lambda console: render(result, console), lambda: document(result), json_report)


def document(result: FinetuneResult) -> dict[str, Any]:
    run = result.train
    body = {"checkpoint": result.checkpoint, "output": str(result.paths.out),
            "best_output": str(result.paths.best) if run.best is not None else None,
            "schedule": result.schedule, "requested": result.requested, "teacher": result.teacher,
            "config": result.config.result_fields(), "world_size": result.world_size, "device": result.device,
            "steps": run.steps, "epochs": run.epochs_done, "resumed_from": run.resumed_from,
            "train": {"images": run.train_images, "seconds": run.train_seconds,
                      "images_per_second": run.images_per_second, "input": run.input_path, "workers": run.workers,
                      "compile": result.config.compile},
            "evals": run.evals, "final": run.final, "best": run.best,
            "before": result.before, "after": result.after, "schedules": run.hook_summaries, "plans": run.plans,
            "loss": None if result.loss is None else result.loss.to_json(), "warnings": result.warnings}
    if result.distillation is not None:  # label-free distillation: what was matched, how close it came
        body["distillation"] = result.distillation
        body["teacher_gap"] = run.teacher_gap
    return json_document("finetune", body, seed=result.config.seed)


def render(outcome: FinetuneResult, console: Console) -> None:
    result, before, after, paths = outcome.train, outcome.before, outcome.after, outcome.paths
    if result.evals:
        labelled, gaps = "top1" in result.evals[-1], "teacher_gap" in result.evals[-1]
        table = Table(title="validation", title_justify="left")
        columns = ("epoch", "step", "train loss", *(("top-1 %", "top-5 %", "val loss") if labelled else ()),
                   *(("teacher gap",) if gaps else ()), "")
        for col in columns:
            table.add_column(col, justify="right" if col else "left")
        for row in result.evals:
            table.add_row(f"{row['epoch']:.2f}", str(row["step"]),
                          f"{row['train_loss']:.4f}" if row.get("train_loss") is not None else "-",
                          *((f"{row['top1']:.2f}", f"{row['top5']:.2f}", f"{row['loss']:.4f}") if labelled else ()),
                          *((f"{row['teacher_gap']:.4f}",) if gaps else ()),
                          "best" if row.get("best") else "")
        console.print(table)
    console.print(f"steps      {result.steps} ({result.epochs_done:.2f} epochs)"
                  + (f", resumed at step {result.resumed_from}" if result.resumed_from is not None else ""))
    console.print(f"throughput {result.images_per_second:,.0f} images/s (training steps, data loading included)")
    if before != after:
        console.print(f"params     {before['params']:,} → {after['params']:,} ({human_count(after['params'])})")
        console.print(f"MACs       {before['macs']:,} → {after['macs']:,} "
                      f"(−{100 * (1 - after['macs'] / max(before['macs'], 1)):.1f} %)")
    for name, summary in result.hook_summaries.items():
        verify = summary.get("verify")
        if verify:
            console.print(f"{name:<10} removed physically; verify max |diff| {verify['max_abs_diff']:.3g} "
                          f"≤ {verify['tolerance']:.3g}: {'passed' if verify['passed'] else 'FAILED'}")
    if result.final is not None and "top1" in result.final:
        console.print(f"final      top-1 {result.final['top1']:.2f} %  top-5 {result.final['top5']:.2f} %")
    gap = result.teacher_gap
    if gap is not None and gap["before"] is not None and gap["after"] is not None:
        held = outcome.distillation or {}
        console.print(f"teacher gap {gap['before']:.4f} → {gap['after']:.4f} (mean relative L2 distance to the teacher's "
                      f"outputs on {held.get('held_out_images')} held-out images, 0: the same)")
    console.print(f"saved      {paths.out}" + (f" (best: {paths.best}, {_best(result.best)} at step {result.best['step']})"
                                                if result.best is not None and (outcome.validated or gap) else ""))


def _best(row: dict[str, Any]) -> str:
    return f"top-1 {row['top1']:.2f} %" if "top1" in row else f"teacher gap {row['teacher_gap']:.4f}"
