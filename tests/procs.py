"""Test helpers: the live child processes of a process, and waiting for a condition (Linux: /proc)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path


def children(pid: int) -> list[int]:
    """Live child processes of ``pid`` (from /proc; zombies excluded)."""
    out = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()      # after "pid (comm) ": state, ppid, ...
        if int(fields[1]) == pid and fields[0] != "Z":
            out.append(int(d.name))
    return out


def alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] != "Z"


def wait_until(cond, timeout: float) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(0.1)
    return cond()


def survivors_of_a_killed_caller(script: str, n_children: int, settle_s: float = 0.0) -> list[int]:
    """Run ``script`` (which prints ``started`` once its children run) in a fresh interpreter, wait for
    ``n_children`` children and ``settle_s`` more, SIGKILL it; the children still alive 15 s later."""
    p = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().strip() == "started"
        assert wait_until(lambda: len(children(p.pid)) >= n_children, 60)
        kids = children(p.pid)
        time.sleep(settle_s)
        p.kill()
        p.wait()
        wait_until(lambda: not any(alive(k) for k in kids), 15)
        return [k for k in kids if alive(k)]
    finally:
        p.kill()
        for k in children(p.pid):
            os.kill(k, signal.SIGKILL)
