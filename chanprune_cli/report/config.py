"""`chanprune config`'s report: every setting with where it comes from, the last score this
directory recorded; and its JSON document."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from .common import json_document, print_table, publish

if TYPE_CHECKING:
    from ..project.config import ConfigFile


def show(files: list[ConfigFile], rows: dict[str, list[dict[str, Any]]], last: dict[str, Any], state_file: str,
         json_report: str | None) -> None:
    """`files`: the config files applied, lowest precedence first; `rows`:
    per command, its settings as {key, value, source}; `last`: the recorded state (project.state)."""
    publish(lambda console: render([f.label for f in files], rows, last, state_file, console),
            lambda: json_document("config", {"files": [str(f.path) for f in files], "commands": rows, "last": last},
                                  seed=None),
            json_report)


def render(files: list[str], rows: dict[str, list[dict[str, Any]]], last: dict[str, Any], state_file: str,
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
