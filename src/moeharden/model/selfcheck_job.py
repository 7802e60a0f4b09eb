"""The self-check beside a command: :func:`moeharden.model.selfcheck.check_adapter` in a child process.

``prune`` and ``lock`` stream shards and never import the family's modeling code, which is most of
a cold self-check's cost (about a second). So they start the check in a child process
(``python -m moeharden.model.selfcheck_job``; the tiny config travels over a pipe, the child
reads no file of the checkpoint), write their output into the temporary directory meanwhile, and
wait for the verdict before committing it (:func:`adapter_check`): a failed check refuses the
checkpoint and nothing appears at the output. A cached result needs no child; a child that dies
or answers garbage is replaced by the check in this process — a child can make the check faster,
never let it pass.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from moeharden.model.selfcheck import SelfCheckResult, prepare, refusal_error, remember, run_check


class PendingCheck:
    """A self-check under way in a child process (see :func:`start_check`); :meth:`result` waits."""

    def __init__(self, result: SelfCheckResult | None = None, *, proc=None, key: str = "", tiny: Any = None,
                 spec=None, seed: int = 0):
        self._result, self._proc, self._key, self._tiny, self._spec, self._seed = result, proc, key, tiny, spec, seed

    def result(self) -> SelfCheckResult:
        """The child's result; should the child fail to give one, the check runs here instead (a
        child can make the check faster, never let it pass)."""
        if self._result is not None:
            return self._result
        got = None
        try:
            out, _ = self._proc.communicate(timeout=600)
            if self._proc.returncode == 0:
                d = json.loads(out.decode().strip().splitlines()[-1])
                got = SelfCheckResult(str(d["family"]), bool(d["ok"]), str(d["reason"]), float(d["record_max_abs"]),
                                      float(d["prune_max_abs"]), float(d["seconds"]))
        except Exception:           # no answer, a crash, a garbled line: compute it here
            self.close()
        if got is None or got.family != self._spec.name:
            got = run_check(self._tiny, self._spec, self._seed)
        self._result = remember(self._key, got)
        return self._result

    def close(self) -> None:
        """Stop the child if it still runs (the command failed before it needed the result)."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait()


def start_check(config: Any, *, seed: int = 0) -> PendingCheck:
    """:func:`check_adapter` in a child process, so that the command does its own work meanwhile.

    A cached result is returned at once. The tiny config travels to the child as its
    ``to_dict()`` over a pipe (the child reads no file of the checkpoint); configs whose class is
    not part of transformers (remote code) are checked in this process.

    Raises:
        UnsupportedModelError: unsupported or refused family.
    """
    import subprocess
    import sys

    prepared = prepare(config, seed)
    if isinstance(prepared, SelfCheckResult):
        return PendingCheck(prepared)
    key, tiny, spec = prepared
    cls = type(tiny)
    if not cls.__module__.startswith("transformers."):
        return PendingCheck(remember(key, run_check(tiny, spec, seed)))
    job = json.dumps({"module": cls.__module__, "cls": cls.__name__, "config": tiny.to_dict(), "seed": seed})
    try:
        proc = subprocess.Popen([sys.executable, "-m", "moeharden.model.selfcheck_job"], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        proc.stdin.write(job.encode())
        proc.stdin.close()
    except OSError:
        return PendingCheck(remember(key, run_check(tiny, spec, seed)))
    return PendingCheck(proc=proc, key=key, tiny=tiny, spec=spec, seed=seed)


def ensure_pending(pending: PendingCheck) -> SelfCheckResult:
    """Wait for a :func:`start_check` and refuse as :func:`ensure_adapter` does when it failed.

    Raises:
        UnsupportedModelError: the self-check failed (exit 3).
    """
    result = pending.result()
    if not result.ok:
        raise refusal_error(result)
    return result


class _Check:
    """What :func:`adapter_check` yields: :meth:`ensure` waits for the check and refuses on failure."""

    def __init__(self, pending: PendingCheck | None):
        self.pending = pending

    def ensure(self) -> SelfCheckResult | None:
        """Raises UnsupportedModelError (exit 3) when the self-check failed; ``None`` when skipped."""
        return None if self.pending is None else ensure_pending(self.pending)


@contextmanager
def adapter_check(config: Any, *, enabled: bool = True) -> Iterator[_Check]:
    """The self-check of ``config``'s adapter, running in a child while the block works.

    Call ``.ensure()`` before committing anything written (a failure refuses the checkpoint); the
    child is stopped when the block ends without asking (the command failed earlier).

    Raises:
        UnsupportedModelError: unsupported or refused family (at once), or ``ensure`` on a failed check.
    """
    pending = start_check(config) if enabled else None
    try:
        yield _Check(pending)
    finally:
        if pending is not None:
            pending.close()


def _child_main() -> None:
    """``python -m moeharden.model.selfcheck_job``: one job (JSON on stdin) → one result line (JSON)."""
    import importlib
    import sys

    from moeharden.model.registry import spec_for_config

    job = json.loads(sys.stdin.read())
    tiny = getattr(importlib.import_module(job["module"]), job["cls"]).from_dict(job["config"])
    r = run_check(tiny, spec_for_config(tiny), int(job["seed"]))
    print(json.dumps({"family": r.family, "ok": r.ok, "reason": r.reason, "record_max_abs": r.record_max_abs,
                      "prune_max_abs": r.prune_max_abs, "seconds": r.seconds}))


if __name__ == "__main__":
    _child_main()
