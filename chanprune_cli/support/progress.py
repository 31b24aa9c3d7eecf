"""Progress bars for long loops: one look everywhere, on stderr, only when stderr is a terminal
(so pipes, CI logs and JSON on stdout stay clean)."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable
from typing import Any


def stderr_is_terminal() -> bool:
    try:
        return sys.stderr.isatty() and os.environ.get("TERM") != "dumb"
    except (AttributeError, ValueError):  # replaced or closed stderr
        return False


def batches_total(loader: Iterable[Any], max_batches: int | None) -> int | None:
    """How many batches a loop over `loader` bounded by `max_batches` runs (None: unknown)."""
    try:
        total: int | None = len(loader)  # type: ignore[arg-type]
    except TypeError:
        total = None
    if max_batches is not None:
        total = max_batches if total is None else min(total, max_batches)
    return total


def progress_bar(field: str, *, eta: bool = True, enabled: bool = True) -> Any:
    """A transient rich Progress on stderr: description, bar, n/total, the task field `field`
    (e.g. images/s), elapsed and (with `eta`) remaining time. Disabled off a terminal."""
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    columns = [TextColumn("[progress.description]{task.description}"), BarColumn(), MofNCompleteColumn(),
               TextColumn(f"{{task.fields[{field}]}}"), TimeElapsedColumn(), *([TimeRemainingColumn()] if eta else [])]
    return Progress(*columns, console=Console(stderr=True), transient=True,
                    disable=not (enabled and stderr_is_terminal()))
