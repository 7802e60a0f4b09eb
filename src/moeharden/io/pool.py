"""Worker processes for independent jobs that stop when their caller stops (:func:`worker_pool`).

A plain :class:`concurrent.futures.ProcessPoolExecutor` left by an exception — a Ctrl-C, one job's
error, a failing progress callback — waits in its ``shutdown`` for *every* job it was given: a
scan's ladder interrupted after its first curve ran all the others before it exited. And a caller
killed outright left its workers running their curves, orphaned. :func:`worker_pool` yields such an
executor (``spawn``; each worker runs ``initializer(*initargs)`` once) with both fixed:

* an exception in the ``with`` block cancels the jobs not yet started and terminates the workers
  (killed if still alive :data:`JOIN_S` later) before it propagates;
* a worker ignores SIGINT (started with it held back, so a Ctrl-C during its start-up is not a
  traceback either): a terminal's Ctrl-C reaches the whole process group, and the caller's
  interrupt stops the workers as above;
* on Linux each worker asks the kernel for SIGTERM when its parent dies (:func:`die_with_parent`,
  ``PR_SET_PDEATHSIG``; :mod:`moeharden.io.beside`'s child does too), so a caller killed with
  SIGKILL takes its workers with it.

Leaving the block normally waits for the jobs, as ``ProcessPoolExecutor`` does.
"""

from __future__ import annotations

import ctypes
import multiprocessing as mp
import os
import signal
import sys
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager

JOIN_S = 10.0           # after SIGTERM, how long a worker may take to exit before it is killed
_PR_SET_PDEATHSIG = 1


def die_with_parent(parent: int) -> None:
    """In a child process: ask for SIGTERM when the parent ``parent`` dies (Linux; a no-op elsewhere),
    and exit now if it already has."""
    if not sys.platform.startswith("linux"):
        return
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM))
    except (OSError, AttributeError):
        return                                       # best effort: the caller's own stop still applies
    if os.getppid() != parent:                       # the parent died before the request was made
        os._exit(1)


@contextmanager
def _sigint_held() -> Iterator[None]:
    """SIGINT blocked in this thread for the block: a process started meanwhile inherits the mask, so
    a Ctrl-C during its start-up waits (in both) instead of tracing back from the child's bootstrap."""
    if not hasattr(signal, "pthread_sigmask"):
        yield
        return
    old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def _start_worker(parent: int, initializer: Callable | None, initargs: tuple) -> None:
    """In each worker, before its initializer: ignore Ctrl-C (the caller stops its workers; a terminal's
    Ctrl-C reaches the whole process group), die with the parent, then initialise."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})     # a Ctrl-C held since the start is dropped
    die_with_parent(parent)
    if initializer is not None:
        initializer(*initargs)


@contextmanager
def worker_pool(workers: int, initializer: Callable | None = None, initargs: tuple = ()) -> Iterator[ProcessPoolExecutor]:
    """A ``spawn`` process pool of ``workers`` processes, stopped at once if its block raises."""
    ex = ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("spawn"), initializer=_start_worker,
                             initargs=(os.getpid(), initializer, tuple(initargs)))
    try:
        with _sigint_held():                   # start every worker now (one no-op job each spawns them)
            for _ in range(workers):
                ex.submit(int)
        yield ex
    except BaseException:
        stop_pool(ex)
        raise
    ex.shutdown(wait=True)


def stop_pool(ex: ProcessPoolExecutor) -> None:
    """Cancel the jobs not started, terminate the workers (SIGTERM, then SIGKILL after :data:`JOIN_S`)
    and reap them."""
    procs = list((getattr(ex, "_processes", None) or {}).values())   # no public handle before Python 3.14
    ex.shutdown(wait=False, cancel_futures=True)
    for p in procs:
        if p.is_alive():
            p.terminate()
    for p in procs:
        p.join(JOIN_S)
        if p.is_alive():
            p.kill()
            p.join()
