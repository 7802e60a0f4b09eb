"""A Ctrl-C held until the unit of work in progress ends (:class:`HeldInterrupt`).

A training loop that checkpoints every N steps loses the steps since its last checkpoint when it
is interrupted. Inside a :class:`HeldInterrupt` block the first SIGINT only sets
:attr:`HeldInterrupt.requested`; the loop finishes the step in progress, writes its checkpoint
and raises :class:`KeyboardInterrupt` itself (:meth:`HeldInterrupt.raise_if_requested`). A
second SIGINT interrupts at once, as without the block (an impatient user, or a caller that
stops a child it waited long enough for). Where a handler cannot be installed — not the main
thread, or SIGINT ignored by the process (a shell's background job) — the block changes nothing.
"""

from __future__ import annotations

import signal
import threading


class HeldInterrupt:
    """Hold the first SIGINT of the block until the caller asks for it (context manager)."""

    def __init__(self, enabled: bool = True):
        self.requested = False
        self._enabled = enabled
        self._previous = None

    def __enter__(self) -> HeldInterrupt:
        if not self._enabled or threading.current_thread() is not threading.main_thread():
            return self
        previous = signal.getsignal(signal.SIGINT)
        if previous in (signal.SIG_IGN, None):           # ignored, or set outside Python: left alone
            return self
        self._previous = previous
        signal.signal(signal.SIGINT, self._hold)
        return self

    def _hold(self, signum, frame) -> None:
        self.requested = True
        signal.signal(signal.SIGINT, self._previous)      # a second Ctrl-C interrupts at once

    def raise_if_requested(self) -> None:
        """Raise the held :class:`KeyboardInterrupt` (call once the unit in progress is saved)."""
        if self.requested:
            raise KeyboardInterrupt

    def __exit__(self, kind, err, tb) -> bool:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
            self._previous = None
        return False
