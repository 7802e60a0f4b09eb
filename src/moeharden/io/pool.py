"""Worker processes for independent jobs that stop when their caller stops (:func:`worker_pool`).

A plain :class:`concurrent.futures.ProcessPoolExecutor` left by an exception — a Ctrl-C, one job's
error, a failing progress callback — waits in its ``shutdown`` for *every* job it was given: a
scan's ladder interrupted after its first curve ran all the others before it exited. And a caller
killed outright left its workers running their curves, orphaned. :func:`worker_pool` yields such an
executor (``spawn``; each worker runs ``initializer(*initargs)`` once) with both fixed:

* an exception in the ``with`` block cancels the jobs not yet started and terminates the workers
  (killed if still alive :data:`JOIN_S` later) before it propagates;
* on Linux each worker asks the kernel for SIGTERM when its parent dies (``PR_SET_PDEATHSIG``), so a
  caller killed with SIGKILL takes its workers with it.

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


def _start_worker(parent: int, initializer: Callable | None, initargs: tuple) -> None:
    """In each worker, before its initializer: die with the parent (Linux), then initialise."""
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM))
        except (OSError, AttributeError):
            pass                                     # best effort: the caller's own stop still applies
        if os.getppid() != parent:                   # the parent died before the request was made
            os._exit(1)
    if initializer is not None:
        initializer(*initargs)


@contextmanager
def worker_pool(workers: int, initializer: Callable | None = None, initargs: tuple = ()) -> Iterator[ProcessPoolExecutor]:
    """A ``spawn`` process pool of ``workers`` processes, stopped at once if its block raises."""
    ex = ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("spawn"), initializer=_start_worker,
                             initargs=(os.getpid(), initializer, tuple(initargs)))
    try:
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
