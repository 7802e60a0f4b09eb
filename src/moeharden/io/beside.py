"""Run one library call in a separate process beside the current work (:class:`Beside`).

For work that leaves a core idle: e.g. the demo trains its release (one thread: the demo model's
tensors are too small for a second one to help) while the baseline scan attacks the original.
The call runs in a ``spawn``-ed process with ``threads`` compute threads and silent progress
bars; :meth:`Beside.result` returns its value or re-raises its exception (a typed
:class:`~moeharden.errors.MoehardenError` arrives as itself). Leaving the ``with`` block early — an
error in the caller — interrupts the child with SIGINT, so its own clean-up (an atomic output's
temporary directory) runs, then waits for it. A Ctrl-C at the terminal reaches the child itself,
so after the caller's own Ctrl-C it is sent one only if it is still running
:data:`INTERRUPT_WAIT_S` later; a child still running :data:`STOP_GRACE_S` after that is killed.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import time
from collections.abc import Callable
from typing import Any

STOP_GRACE_S = 30.0     # after SIGINT, how long the child may take to clean up before it is killed
INTERRUPT_WAIT_S = 2.0  # after the caller's own Ctrl-C, how long before the child is sent one too


def _child(conn, fn: Callable, kwargs: dict, threads: int, parent: int) -> None:
    import torch

    from moeharden.console import set_json_mode
    from moeharden.io.pool import die_with_parent

    die_with_parent(parent)                  # a caller killed outright does not leave the call running

    # SIGINT is the caller's stop request: a caller started with it ignored (a shell's background
    # job) would hand that on, and the child would be killed after STOP_GRACE_S without its clean-up
    signal.signal(signal.SIGINT, signal.default_int_handler)
    torch.set_num_threads(threads)
    set_json_mode(True)                      # no progress bars drawn over the caller's
    t0 = time.perf_counter()
    try:
        value = fn(**kwargs)
        conn.send(("ok", value, time.perf_counter() - t0))
    except BaseException as err:             # noqa: BLE001 - handed to the caller, who re-raises it
        try:
            conn.send(("error", err, time.perf_counter() - t0))
        except Exception:                    # an exception that does not pickle
            conn.send(("error", RuntimeError(f"{type(err).__name__}: {err}"), time.perf_counter() - t0))
    finally:
        conn.close()


class Beside:
    """``fn(**kwargs)`` in a spawned process with ``threads`` threads, started on entering the block."""

    def __init__(self, fn: Callable, *, threads: int = 1, **kwargs: Any):
        self._fn, self._kwargs, self._threads = fn, kwargs, threads
        self._proc = None
        self._conn = None
        self.seconds: float | None = None     # the call's own wall time, in the child

    def __enter__(self) -> Beside:
        ctx = mp.get_context("spawn")
        self._conn, child_end = ctx.Pipe(duplex=False)
        self._proc = ctx.Process(target=_child, args=(child_end, self._fn, self._kwargs, self._threads, os.getpid()), daemon=False)
        self._proc.start()
        child_end.close()
        return self

    def result(self) -> Any:
        """Wait for the call; its return value.

        Raises:
            whatever the call raised; RuntimeError when the process died without an answer.
        """
        try:
            kind, value, self.seconds = self._conn.recv()
        except EOFError:
            self._proc.join()
            raise RuntimeError(f"the process running {getattr(self._fn, '__name__', 'the call')} died "
                               f"(exit code {self._proc.exitcode}) without a result") from None
        self._proc.join()
        if kind == "error":
            raise value
        return value

    def __exit__(self, kind, err, tb) -> bool:
        if self._proc is not None and self._proc.is_alive():
            if kind is not None:                  # the caller failed or was interrupted: stop the child
                if issubclass(kind, KeyboardInterrupt):
                    self._proc.join(INTERRUPT_WAIT_S)     # a Ctrl-C at the terminal has reached it already
                if self._proc.is_alive():
                    os.kill(self._proc.pid, signal.SIGINT)
                self._proc.join(STOP_GRACE_S)
                if self._proc.is_alive():
                    self._proc.kill()
            self._proc.join()
        if self._conn is not None:
            self._conn.close()
        return False
