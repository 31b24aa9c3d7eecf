"""How the command line fails: one stderr line and the exit code of the exception's class (a full
traceback with --debug or CHANPRUNE_DEBUG=1), and chanprune's own Python warnings as one
`warning:` line each."""

from __future__ import annotations

import os
import sys
import traceback
from collections.abc import Callable
from typing import Any, NoReturn

import typer
from typer.exceptions import TyperException

DEBUG_KEY = "chanprune.debug"  # in ctx.meta, which every nested context shares
DEBUG_ENV = "CHANPRUNE_DEBUG"


def debug_callback(ctx: typer.Context, value: bool) -> bool:
    """`--debug` on a subcommand: remembered for the whole invocation."""
    if value:
        ctx.meta[DEBUG_KEY] = True
    return value


def _debug_enabled(ctx: typer.Context | None) -> bool:
    if os.environ.get(DEBUG_ENV, "").strip().lower() in {"1", "true", "yes", "on"}:
        return True
    return bool(ctx is not None and ctx.meta.get(DEBUG_KEY))


def one_line(text: str) -> str:
    # The contract is one line on stderr; library messages should already be one line.
    return " ".join(text.split())


def fail(ctx: typer.Context, message: str, code: int) -> NoReturn:
    if _debug_enabled(ctx):
        traceback.print_exc(file=sys.stderr)
    typer.echo(message, err=True)
    raise typer.Exit(code)


def usage_error(ctx: typer.Context, exc: TyperException) -> None:
    """Usage errors (bad option values, unknown options; exit 2) follow the one-line contract too,
    instead of a usage banner plus a boxed message. Help requests keep Typer's output."""
    if getattr(exc, "exit_code", None) != 2 or type(exc).__name__ == "NoArgsIsHelpError":
        return
    where = getattr(getattr(exc, "ctx", None), "command_path", None) or ctx.command_path
    fail(ctx, f"error: {one_line(exc.format_message())} (see '{where} --help')", 2)


def warning_printer(previous: Callable[..., None]) -> Callable[..., None]:
    """Show chanprune's own warnings (e.g. skipped unreadable images) as one `warning:` line."""

    shown: set[str] = set()  # a data set opened twice in one run (calibration, recalibration) warns once

    def show(message: Warning | str, category: type[Warning], filename: str, lineno: int,
             file: Any = None, line: str | None = None) -> None:
        if category.__module__.startswith("chanprune_cli"):
            text = one_line(str(message))
            if text not in shown:
                shown.add(text)
                print(f"warning: {text}", file=sys.stderr)
        else:  # third-party warnings keep Python's format: their source location matters
            previous(message, category, filename, lineno, file, line)

    return show
