"""Progress of long steps, on stderr: a rich bar on a terminal; elsewhere (CI logs, pipes) a plain
`progress:` line every `LOG_EVERY_S` seconds while a step runs, so that a log shows what a job is
doing and how far it got, and a step that ends sooner prints nothing. Training (`StepProgress`)
logs its own step lines off a terminal. stdout is never written to."""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

# Off a terminal: at most one progress line per running step this often (seconds).
LOG_EVERY_S = 5.0


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
    (e.g. images/s), elapsed and (with `eta`) remaining time. Off a terminal, `LogLines` with the
    same calls. Nothing at all unless `enabled`."""
    if not (enabled and stderr_is_terminal()):
        return LogLines(field, enabled=enabled)
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
    return Progress(*columns, console=Console(stderr=True), transient=True)


def busy(label: str) -> Any:
    """A context that shows `label` with the elapsed time while one long call runs (no count)."""
    return _Busy(progress_bar("info", eta=False), label)


class _Busy:
    def __init__(self, bar: Any, label: str) -> None:
        self.bar, self.label = bar, label

    def __enter__(self) -> None:
        self.bar.__enter__()
        self.bar.add_task(self.label, total=None, info="")

    def __exit__(self, *exc: Any) -> None:
        self.bar.__exit__(*exc)


@dataclass
class _Task:
    description: str
    total: float | None
    completed: float = 0.0
    fields: dict[str, Any] = field(default_factory=dict)
    started: float = field(default_factory=time.monotonic)
    logged: bool = False  # a line was printed: its end is printed too


class LogLines:
    """Progress off a terminal, with the calls of rich's Progress that chanprune uses (add_task,
    update, advance, stop/start, as a context): while it is entered, every `LOG_EVERY_S` seconds a
    line per running task, `progress: DESCRIPTION  n/total  FIELD  12 s`, and when the context
    ends, `... done in 40 s` for each task that printed. `counts(n)` formats the counts (bytes for
    `bytes_progress`). Nothing unless `enabled`."""

    def __init__(self, field: str, *, enabled: bool = True, counts: Callable[[float], str] | None = None) -> None:
        self.field = field
        self.enabled = enabled
        self.counts = counts or (lambda n: f"{n:,.0f}")
        self.tasks: list[_Task] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> LogLines:
        if self.enabled:
            self._stop.clear()
            self._thread = threading.Thread(target=self._tick, name="chanprune-progress", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None
        if exc[0] is None:
            with self._lock:
                for task in self.tasks:
                    if task.logged:
                        _write(f"{self._line(task)} · done in {time.monotonic() - task.started:.0f} s")

    def add_task(self, description: str, total: float | None = None, completed: float = 0, **fields: Any) -> int:
        with self._lock:
            self.tasks.append(_Task(description, total, completed, fields))
            return len(self.tasks) - 1

    def update(self, task: int, *, advance: float | None = None, completed: float | None = None,
               total: float | None = None, description: str | None = None, **fields: Any) -> None:
        with self._lock:
            t = self.tasks[task]
            t.completed = completed if completed is not None else t.completed + (advance or 0)
            t.total = total if total is not None else t.total
            t.description = description if description is not None else t.description
            t.fields.update(fields)

    def advance(self, task: int, advance: float = 1) -> None:
        self.update(task, advance=advance)

    def stop(self) -> None:
        """Kept for rich's interface; lines need no pausing."""

    def start(self) -> None:
        """Kept for rich's interface."""

    def _tick(self) -> None:
        while not self._stop.wait(LOG_EVERY_S):
            with self._lock:
                now = time.monotonic()
                for task in self.tasks:
                    if now - task.started >= LOG_EVERY_S:
                        task.logged = True
                        _write(f"{self._line(task)} · {now - task.started:.0f} s")

    def _line(self, task: _Task) -> str:
        parts = [f"progress: {_plain(task.description)}"]
        if task.total is not None:
            parts.append(f"{self.counts(task.completed)}/{self.counts(task.total)}")
        elif task.completed:
            parts.append(self.counts(task.completed))
        extra = str(task.fields.get(self.field, "") or "")
        if extra:
            parts.append(_plain(extra))
        return " · ".join(parts)


def _plain(text: str) -> str:
    """A description as plain text: rich markup and escapes removed (text that is no markup as it is)."""
    from rich.errors import MarkupError
    from rich.text import Text

    try:
        return Text.from_markup(text).plain
    except MarkupError:
        return text


def _write(line: str) -> None:
    try:
        sys.stderr.write(line + "\n")  # one write: lines from this thread never split another's
        sys.stderr.flush()
    except (ValueError, OSError):  # stderr closed under us (a finished test runner, a dead pipe)
        pass


@contextmanager
def bytes_progress(description: str, total: int) -> Iterator[Callable[[int], None]]:
    """A transient bar labelled `description` over `total` bytes (done / total, speed, elapsed,
    remaining) while a file is read; yields `advance(n)` for each n bytes read. Off a terminal,
    `LogLines` counting MB."""
    if not stderr_is_terminal():
        from rich.markup import escape

        with LogLines("", counts=lambda n: f"{n / 1e6:,.1f} MB") as lines:
            task = lines.add_task(escape(description), total=total)
            yield lambda n: lines.advance(task, n)
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
