"""The rich console every report and run plan prints to."""

from __future__ import annotations

from rich.console import Console


def make_console(*, stderr: bool = False) -> Console:
    """A console bound to the current stdout/stderr (so test runners that swap them capture it)."""
    # Wider than rich's 80-column default when not on a terminal: tables in logs stay readable.
    probe = Console(stderr=stderr)
    width = None if probe.is_terminal else 120
    return Console(stderr=stderr, width=width, highlight=False)
