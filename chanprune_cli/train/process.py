"""Process-wide settings a run holds while it lasts and restores afterwards: SIGINT/SIGTERM
handlers that turn a signal into a stop request (the trainer finishes the step, saves, then
raises `Stopped`, whose exit code the command line returns), and the number of intra-op threads."""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch


class Stopped(KeyboardInterrupt):
    """A run stopped on a signal after saving its state. A KeyboardInterrupt, so that everything
    that cleans up after Ctrl-C does so here too; `exit_code` is the shell's 128 + signal number
    (130 for SIGINT, 143 for SIGTERM), which schedulers read as "terminated as asked"."""

    def __init__(self, signal_name: str, exit_code: int) -> None:
        super().__init__(signal_name)
        self.signal_name = signal_name
        self.exit_code = exit_code


class StopRequest:
    """SIGINT/SIGTERM set a flag checked between steps (a second Ctrl-C aborts at once)."""

    def __init__(self) -> None:
        self.requested = False
        self.signal_name = ""
        self.signal_number = 0
        self._previous: dict[int, Any] = {}

    def _handler(self, signum: int, frame: Any) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True
        self.signal_name = signal.Signals(signum).name
        self.signal_number = int(signum)

    def stopped(self) -> Stopped:
        """The exception that ends the run once its state is saved."""
        return Stopped(self.signal_name or "a signal", 128 + (self.signal_number or int(signal.SIGINT)))

    def __enter__(self) -> StopRequest:
        # Signal handlers can only be installed from the main thread.
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                try:
                    self._previous[sig] = signal.signal(sig, self._handler)
                except (ValueError, OSError):  # pragma: no cover - exotic embedding
                    pass
        return self

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()


@contextmanager
def threads(n: int | None) -> Iterator[None]:
    """Run with `n` intra-op threads (None: leave torch's default), restored afterwards."""
    if n is None:
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(max(1, n))
    try:
        yield
    finally:
        torch.set_num_threads(previous)
