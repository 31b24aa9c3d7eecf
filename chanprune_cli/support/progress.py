"""Progress bars for long loops: one look everywhere, on stderr, only when stderr is a terminal
(so pipes, CI logs and JSON on stdout stay clean). Loops long enough to need a trace in logs
(`StepProgress`, training) print plain periodic lines instead when stderr is not a terminal."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
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


@contextmanager
def bytes_progress(description: str, total: int) -> Iterator[Callable[[int], None]]:
    """A transient bar labelled `description` over `total` bytes (done / total, speed, elapsed,
    remaining) while a file is read; yields `advance(n)` for each n bytes read. Off a terminal
    nothing shows and `advance` does nothing."""
    if not stderr_is_terminal():
        yield lambda n: None
        return
    from rich.console import Console
    from rich.markup import escape
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    columns = [TextColumn("[progress.description]{task.description}"), BarColumn(), DownloadColumn(),
               TransferSpeedColumn(), TimeElapsedColumn(), TimeRemainingColumn()]
    with Progress(*columns, console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task(escape(description), total=total)
        yield lambda n: bar.update(task, advance=n)


class StepProgress:
    """Progress of a loop of `total` steps that may start part-way (a resumed run) and pause (while
    something else prints). On a terminal: a `progress_bar` with a free-text field; otherwise a line
    `step n/total  <text>` on stderr after the first step, every `log_every` steps and the last.
    Nothing at all unless `enabled`."""

    def __init__(self, description: str, total: int, *, completed: int = 0, log_every: int,
                 enabled: bool = True) -> None:
        self.description = description
        self.total = total
        self.completed = completed
        self.log_every = log_every
        self.enabled = enabled
        self.tty = enabled and stderr_is_terminal()
        self._bar: Any = None
        self._task: Any = None
        self._paused = False

    def __enter__(self) -> StepProgress:
        if self.tty:
            self._bar = progress_bar("info")
            self._bar.__enter__()
            self._task = self._bar.add_task(self.description, total=self.total, completed=self.completed, info="")
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._bar is not None:
            self._bar.__exit__(*exc)
            self._bar = None

    def update(self, completed: int, text: Callable[[], str]) -> None:
        """`completed` steps done; `text()` (called only when shown) fills the free-text field."""
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.update(self._task, completed=completed, info=text())
        elif completed % self.log_every == 0 or completed == self.total or completed == 1:
            print(f"step {completed}/{self.total}  {text()}", file=sys.stderr, flush=True)

    def pause(self) -> None:
        """Take the bar off the terminal (a no-op for log lines) until `resume()`."""
        if self._bar is not None and not self._paused:
            self._bar.stop()
            self._paused = True

    def resume(self) -> None:
        if self._bar is not None and self._paused:
            self._bar.start()
            self._paused = False
