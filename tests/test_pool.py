"""io/pool.py: worker processes stop when their caller stops — an error or Ctrl-C in the caller, the
caller killed outright, and end to end, a Ctrl-C'd `moeharden scan --workers 2` (exit 130, no output; only
the journal of its finished curves is left, for a run again to resume from)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from procs import alive, children, survivors_of_a_killed_caller, wait_until

from moeharden.io.pool import worker_pool

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")


def test_results_in_order_and_a_job_error_reaches_the_caller():
    with worker_pool(2) as ex:
        assert [f.result() for f in [ex.submit(pow, b, 2) for b in range(6)]] == [0, 1, 4, 9, 16, 25]
    with pytest.raises(ZeroDivisionError), worker_pool(2) as ex:
        ex.submit(divmod, 1, 0).result()


def test_an_error_in_the_caller_cancels_the_queue_and_ends_the_workers_at_once():
    t0 = time.monotonic()
    with pytest.raises(RuntimeError, match="caller failed"), worker_pool(2) as ex:
        futures = [ex.submit(time.sleep, 30) for _ in range(6)]       # 90 s of work for two workers
        assert wait_until(lambda: len(children(os.getpid())) >= 2, 60)
        workers = [p for p in children(os.getpid()) if "resource_tracker" not in Path(f"/proc/{p}/cmdline").read_text()]
        raise RuntimeError("caller failed")
    assert time.monotonic() - t0 < 25, "a plain ProcessPoolExecutor would have run all six jobs (90 s)"
    assert workers and not any(alive(p) for p in workers)
    assert futures[-1].cancelled()     # two run, at most three wait in the workers' queue: the last was still pending
    assert not any(f.done() and not f.cancelled() and f.exception() is None for f in futures)


def test_workers_die_with_a_caller_killed_outright():
    script = textwrap.dedent("""
        import sys, time
        from moeharden.io.pool import worker_pool
        with worker_pool(2) as ex:
            fs = [ex.submit(time.sleep, 60) for _ in range(4)]
            print("started", flush=True)
            time.sleep(120)
    """)
    assert survivors_of_a_killed_caller(script, 3) == []           # two workers and the resource tracker


@pytest.mark.parametrize("to", ["group", "parent"])
def test_ctrl_c_ends_a_scan_with_two_workers_at_once_and_writes_nothing(demo_ckpt, tmp_path, to):
    out = tmp_path / "scan"
    p = subprocess.Popen([sys.executable, "-m", "moeharden", "scan", str(demo_ckpt), "--out", str(out), "--ladder",
                          "--workers", "2", "--limit", "64", "--method", "frequency", "--keep", "2", "--json"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                         # one compute thread: beside another test file's work (pytest-xdist) two would
                         # oversubscribe 2 cores and the scan could take minutes to reach its ladder
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        assert wait_until(lambda: len(children(p.pid)) >= 3 or p.poll() is not None, 240), "the ladder never started"
        assert p.poll() is None, p.communicate()[1]
        kids = children(p.pid)
        time.sleep(2)                                    # the workers are inside their first curves
        t0 = time.monotonic()
        if to == "group":
            os.killpg(p.pid, signal.SIGINT)              # Ctrl-C at a terminal: the whole process group
        else:
            os.kill(p.pid, signal.SIGINT)                # `kill -INT PID`: the scan's own process only
        _, err = p.communicate(timeout=60)
        took = time.monotonic() - t0
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
    assert p.returncode == 130, err
    assert took < 20, f"the scan took {took:.0f} s to stop"
    assert "Traceback" not in err and "Interrupted" in err
    assert wait_until(lambda: not any(alive(k) for k in kids), 15), "workers outlived the interrupted scan"
    # no output, and nothing but the journal of the curves it finished (a run again resumes from it)
    assert not out.exists() and [q.name for q in tmp_path.iterdir()] == [".scan.ladder-journal"]
    assert (tmp_path / ".scan.ladder-journal" / ".moeharden-output").is_file()
