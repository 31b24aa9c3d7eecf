"""The `chanprune` command line (DESIGN §8): parse options, call the library, render.

One module per subcommand; importing them registers the commands on `app` (in help order).
"""

# ruff: noqa: I001  (the import order below is the order of `chanprune --help`)
from __future__ import annotations

import sys
from collections.abc import Sequence

from . import analyze, score, prune, finetune, export, bench, run, project  # noqa: F401  (registers the commands)
from .common import app

__all__ = ["app", "main"]


def main(argv: Sequence[str] | None = None) -> int:
    """Console-script entry point; returns the exit code (DESIGN §8)."""
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
