"""The processes of one ``accelerate launch`` (or ``torchrun``): which one this is, and sharing work.

``accelerate launch --num_processes N`` starts N copies of a command with ``RANK`` and
``WORLD_SIZE`` set. The attack suites of ``scan`` and ``verify`` are lists of independent jobs
(curves, recovery runs); :func:`spread` runs every N-th job in each process and gives every process
all results in job order, so the documents the main process writes are the ones a single process
writes. ``entangle`` shares one optimizer step's micro-batches and sums the gradients
(:func:`sum_`). Collectives use a gloo group (CPU tensors and Python objects), created on the
process group accelerate set up, or on a new one when none exists.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, TypeVar

if TYPE_CHECKING:                # torch is imported where a collective runs: `current()` stays cheap
    import torch

T = TypeVar("T")
R = TypeVar("R")

_GROUP: list = []        # the gloo group, created once per process


@dataclass(frozen=True)
class Ranks:
    """This process's index and the number of processes (``size`` 1: a plain single-process run)."""

    rank: int
    size: int

    @property
    def main(self) -> bool:
        """Whether this process writes outputs and prints (rank 0)."""
        return self.rank == 0


def current() -> Ranks:
    """The launch this process belongs to, from ``RANK`` / ``WORLD_SIZE`` (absent: a single process)."""
    size = int(os.environ.get("WORLD_SIZE", "1") or 1)
    rank = int(os.environ.get("RANK", "0") or 0) if size > 1 else 0
    return Ranks(rank, max(size, 1))


def _group():
    """The gloo group every collective here uses (the process group is initialised if needed)."""
    import torch.distributed as dist

    if _GROUP:
        return _GROUP[0]
    if not dist.is_initialized():
        import atexit

        dist.init_process_group("gloo")               # env:// rendezvous from the launcher's variables
        atexit.register(close)                        # a fallback; close() before exiting is what holds
    _GROUP.append(dist.new_group(backend="gloo") if dist.get_backend() != "gloo" else dist.group.WORLD)
    return _GROUP[0]


def close(timeout_s: float = 60.0) -> None:
    """End this process's part in the launch: wait (at most ``timeout_s``) for the others, then
    close the process groups. Call it before the interpreter exits (the CLI does): a gloo group
    still open while the interpreter shuts down can abort the process after its work is done."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return
    try:
        dist.monitored_barrier(group=_group(), timeout=timedelta(seconds=timeout_s))
    except RuntimeError:           # a process failed or left: there is nothing to wait for
        pass
    finally:
        dist.destroy_process_group()
        _GROUP.clear()


def barrier() -> None:
    """Wait for every process (a no-op in a single process)."""
    if current().size > 1:
        import torch.distributed as dist

        dist.barrier(group=_group())


class RankFailed(RuntimeError):
    """Another process of the launch failed; its error is in its own output."""


def spread(jobs: Sequence[T], run: Callable[[T], R], *, progress: Callable[[], None] | None = None) -> list[R]:
    """``[run(job) for job in jobs]``, with the jobs shared out over the processes of the launch.

    Process r runs jobs r, r + N, r + 2N, ...; the results are exchanged so that every process
    returns all of them in job order. ``run`` must not depend on which process runs it (each job
    seeds its own randomness). An error in one process is raised in every process (the failing one
    raises its own; the others raise :class:`RankFailed`), so no process waits forever.
    """
    ranks = current()
    if ranks.size <= 1:
        out = []
        for job in jobs:
            out.append(run(job))
            if progress is not None:
                progress()
        return out
    import torch.distributed as dist

    mine, error = [], None
    for i in range(ranks.rank, len(jobs), ranks.size):
        try:
            mine.append((i, run(jobs[i])))
        except Exception as err:      # re-raised below, after the others know: a lone failure would hang them
            error = err
            break
        if progress is not None:
            progress()
    parts: list = [None] * ranks.size
    dist.all_gather_object(parts, (error is not None, mine), group=_group())
    if error is not None:
        raise error
    if any(failed for failed, _ in parts):
        raise RankFailed("Another process of the launch failed; see its output for the error.")
    out: list = [None] * len(jobs)
    for _, part in parts:
        for i, result in part:
            out[i] = result
    return out


def sum_(tensors: Sequence[torch.Tensor], *, bucket: int = 1 << 23) -> None:
    """Sum ``tensors`` over the processes of the launch, in place, ``bucket`` elements per message.

    CPU tensors go through the gloo group, summed in float64 and rounded once (two processes give
    exactly the float32 sum ``a + b`` a single process accumulates); CUDA tensors through the
    launch's own (NCCL) group in their dtype.
    """
    if current().size <= 1 or not tensors:
        return
    import torch
    import torch.distributed as dist

    def flush(group: list[torch.Tensor]) -> None:
        cuda = group[0].is_cuda
        flat = torch.cat([t.detach().reshape(-1).to(torch.float32 if cuda else torch.float64) for t in group])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=None if cuda else _group())
        at = 0
        for t in group:
            t.copy_(flat[at:at + t.numel()].view_as(t))
            at += t.numel()

    pending: list[torch.Tensor] = []
    size = 0
    for t in tensors:
        if pending and (size + t.numel() > bucket or t.is_cuda != pending[0].is_cuda):
            flush(pending)
            pending, size = [], 0
        pending.append(t)
        size += t.numel()
    if pending:
        flush(pending)
