"""What every command's report shares: number formatting, tables under their own title line,
the fields every JSON document has, and writing a report (tables, then the JSON document)."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

from .. import __version__
from ..support.console import make_console
from ..support.fsutil import write_text_atomic

SCHEMA_VERSION = 1
TOOL_NAME = "chanprune"


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


def names_and_numbers(title: str, first: str, *numbers: str) -> Table:
    """A table under `title`: a column of names (folded when long), then right-aligned columns of numbers."""
    table = Table(title=title, title_justify="left")
    table.add_column(first, overflow="fold")
    for name in numbers:
        table.add_column(name, justify="right")
    return table


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


def publish(render: Callable[[Console], None], document: Callable[[], dict[str, Any]], json_report: str | None) -> None:
    """A command's report: `render` prints its tables (on stderr when `--json -` gives stdout to the
    JSON document), then `document` is written to `json_report` when one was asked for."""
    render(make_console(stderr=json_report == "-"))
    if json_report is not None:
        write_json(document(), json_report)
