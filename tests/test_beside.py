"""`io/beside.Beside`: a library call in a spawned process beside the caller's work (the demo trains
its release while the baseline scan runs). Its value comes back, its typed error is re-raised as
itself, and a caller's failure stops it with SIGINT, so the call's own clean-up runs."""

from __future__ import annotations

import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from procs import survivors_of_a_killed_caller

from moeharden.errors import TaskError
from moeharden.io.beside import Beside


def _threads_and_sum(values):
    return torch.get_num_threads(), sum(values)


def _fails():
    raise TaskError("no such task", hint="pass one")


def _cleans_up(marker: str, started: str):
    try:                                  # `started` exists from its open(): the caller may interrupt the
        Path(started).write_text("running")   # write itself, so it is inside the try
        time.sleep(60)
    finally:
        Path(marker).write_text("cleaned up")


def test_value_and_thread_count_come_back():
    with Beside(_threads_and_sum, threads=1, values=[1, 2, 3]) as b:
        got = b.result()
    assert got == (1, 6)
    assert b.seconds is not None and b.seconds >= 0


def test_a_typed_error_is_reraised_as_itself():
    with pytest.raises(TaskError) as info, Beside(_fails) as b:
        b.result()
    assert info.value.message == "no such task" and info.value.hint == "pass one"


def test_a_failing_caller_interrupts_the_child_and_its_cleanup_runs(tmp_path):
    marker, started = tmp_path / "marker", tmp_path / "started"
    t0 = time.perf_counter()
    with pytest.raises(ValueError), Beside(_cleans_up, marker=str(marker), started=str(started)):
        deadline = time.time() + 60
        while not started.exists() and time.time() < deadline:
            time.sleep(0.05)
        raise ValueError("the caller's own work failed")
    assert marker.read_text() == "cleaned up"             # its finally ran: SIGINT, not a kill
    assert time.perf_counter() - t0 < 50                  # and it did not sleep its 60 s


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_the_child_dies_with_a_caller_killed_outright():
    script = textwrap.dedent("""
        from multiprocessing.connection import wait
        from moeharden.io.beside import Beside
        with Beside(wait, object_list=[], timeout=120) as b:      # a call that blocks for two minutes
            print("started", flush=True)
            b.result()
    """)
    assert survivors_of_a_killed_caller(script, 1, settle_s=3) == []    # settled: the child is inside the call
