"""`chanprune run`'s report: one row per stage (ran, up to date, gates failed) and its JSON document."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from .common import json_document, print_table, publish

if TYPE_CHECKING:
    from ..project.pipeline import StageResult


def show(results: list[StageResult], config_path: str, run_dir: Path, json_report: str | None) -> None:
    publish(lambda console: render(results, run_dir, console), lambda: document(results, config_path, run_dir),
            json_report)


def document(results: list[StageResult], config_path: str, run_dir: Path) -> dict[str, Any]:
    body = {"config": config_path, "run_dir": str(run_dir), "passed": not any(r.status == "failed" for r in results),
            "stages": [{"name": r.name, "status": r.status, "seconds": round(r.seconds, 2), "outputs": r.outputs,
                        **({"error": r.error} if r.error is not None else {})} for r in results]}
    return json_document("run", body, seed=None)


def render(results: list[StageResult], run_dir: Path, console: Console) -> None:
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
