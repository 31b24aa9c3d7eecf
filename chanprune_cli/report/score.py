"""`chanprune score`'s report: the per-group score summary and its JSON document; and the list of
criteria (`--list-criteria`)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.table import Table

from ..support.console import make_console
from .common import json_document, names_and_numbers, print_table, publish

if TYPE_CHECKING:
    from ..recipes.score import ScoreResult


def show(result: ScoreResult, json_report: str | None) -> None:
    publish(lambda console: render(result, console), lambda: document(result), json_report)


def document(result: ScoreResult) -> dict[str, Any]:
    body = {"checkpoint": result.checkpoint, "output": result.output, "criterion": result.criterion.name,
            "data": result.data, "summary_ratio": result.ratio, "groups": result.rows}
    return json_document("score", body, seed=result.seed)


def render(result: ScoreResult, console: Console) -> None:
    table = names_and_numbers(f"{result.criterion.name} scores → {result.output}", "group", "channels", "min", "median",
                              "max", f"removed at --ratio {result.ratio:g}")
    for r in result.rows:
        table.add_row(r["group"], str(r["channels"]), f"{r['min']:.3g}", f"{r['median']:.3g}", f"{r['max']:.3g}",
                      str(r["removed_at_ratio"]))
    print_table(console, table)


def show_criteria() -> None:
    """The criteria, what each needs and its options with defaults (`score --list-criteria`)."""
    from ..criteria.base import criteria_table

    table = Table(title="criteria (set options with --criterion-opt KEY=VALUE)")
    for column in ("criterion", "needs", "options (defaults)", "what it measures", "budget: passes over the data"):
        table.add_column(column, overflow="fold")
    for row in criteria_table():
        table.add_row(*row)
    make_console().print(table)
