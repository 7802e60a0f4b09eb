"""HeldInterrupt: the first SIGINT is held, a second interrupts at once, and nothing changes where
a handler cannot or must not be installed."""

from __future__ import annotations

import os
import signal
import threading

import pytest

from moeharden.io.interrupt import HeldInterrupt


def test_the_first_sigint_is_held_and_the_second_interrupts_at_once():
    before = signal.getsignal(signal.SIGINT)
    with HeldInterrupt() as stop:
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.requested                        # held: we are still here
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)        # handled before the next line runs
    assert signal.getsignal(signal.SIGINT) is before
    with pytest.raises(KeyboardInterrupt), HeldInterrupt() as stop:
        os.kill(os.getpid(), signal.SIGINT)
        stop.raise_if_requested()
    assert signal.getsignal(signal.SIGINT) is before


def test_an_ignored_sigint_and_other_threads_are_left_alone():
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)   # a shell's background job
    try:
        with HeldInterrupt() as stop:
            assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
            os.kill(os.getpid(), signal.SIGINT)
            assert not stop.requested
    finally:
        signal.signal(signal.SIGINT, previous)
    seen = []

    def worker():
        with HeldInterrupt() as stop:
            seen.append((signal.getsignal(signal.SIGINT), stop.requested))

    t = threading.Thread(target=worker)
    t.start()
    t.join()
    assert seen == [(previous, False)]
    with HeldInterrupt(enabled=False):
        assert signal.getsignal(signal.SIGINT) is previous
