"""The `chanprune` command line: parse options, call a recipe (recipes/), hand its result to report/.

`app.py` is the Typer app (exit codes in failures.py, config files in configfiles.py), `options.py`
the shared options; one module per subcommand, whose import registers it on `app` (in help order).
"""

# ruff: noqa: I001  (the import order below is the order of `chanprune --help`)
from __future__ import annotations

import sys
from collections.abc import Sequence

from . import analyze, score, prune, finetune, export, bench, run, project  # noqa: F401  (registers the commands)
from .app import app

__all__ = ["app", "main"]


def main(argv: Sequence[str] | None = None) -> int:
    """Console-script entry point; returns the exit code."""
    try:
        app(args=list(argv) if argv is not None else None, prog_name="chanprune")
    except SystemExit as exc:  # Typer's standalone mode always exits; turn it into a return value
        code = exc.code
        if code is None:
            return 0
        if isinstance(code, int):
            return code
        print(code, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
