"""Exception types that map to the CLI's exit codes."""

from __future__ import annotations


class ChanpruneError(Exception):
    """A failure we can explain in one line. Exit code 1 (runtime failure)."""

    exit_code = 1


class UserError(ChanpruneError):
    """Bad usage or bad input: the message says what is wrong and what to do. Exit code 2."""

    exit_code = 2


class GateFailed(ChanpruneError):
    """A CI gate (--max-acc-drop, --min-speedup) was not met. Exit code 3."""

    exit_code = 3
