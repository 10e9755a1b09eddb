"""Ctrl-C and SIGTERM as a flag that trainers check between steps, so they can checkpoint."""

from __future__ import annotations

import contextlib
import signal


class InterruptFlag:
    """Turns SIGINT/SIGTERM into a flag checked between iterations, so a checkpoint can be saved."""

    def __init__(self) -> None:
        self.requested = False
        self._old = {}
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(ValueError):  # not the main thread: no handler
                self._old[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        if self.requested:  # a second Ctrl-C exits at once
            raise KeyboardInterrupt
        self.requested = True

    def restore(self) -> None:
        for sig, handler in self._old.items():
            signal.signal(sig, handler)
