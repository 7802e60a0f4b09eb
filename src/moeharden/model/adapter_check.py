"""The self-check run beside the command that will rewrite a checkpoint (:class:`AdapterCheck`).

:mod:`moeharden.model.selfcheck` is the check itself; this module runs it in a child process so
that its cost — mostly importing the family's modeling code and building, saving and reloading a
tiny model — overlaps the command's own work instead of preceding it, without ever publishing
output before the check has passed.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
from typing import Any

from moeharden.errors import UnsupportedModelError
from moeharden.model.selfcheck import SelfCheckResult, check_adapter, failure_error, prepare_check, remember


class AdapterCheck:
    """The self-check of one checkpoint's family, running beside the command that will rewrite it.

    Unless the result is cached, the check runs in a forked child process (which shares what the
    command has imported already) on another core while the command reads and writes its
    *temporary* output; :meth:`wait` is called before anything is published, and a failure
    discards the temporary output (the checkpoint is only ever read, and ``--out`` is untouched).
    Used as a context manager: leaving the block waits for the check (so a failed self-check is
    the error reported, also when the command itself failed — a broken adapter may be why) or, on
    Ctrl-C, stops the child. Where ``fork`` does not exist the check runs in-process at
    :meth:`wait`; a child that dies without a result is replaced by the in-process check.
    """

    def __init__(self, config: Any, *, enabled: bool = True, seed: int = 0):
        self._config, self._seed, self._child, self._key = config, seed, None, None
        self.result: SelfCheckResult | None = None
        if not enabled:
            return
        prepared = prepare_check(config, seed)          # an unsupported family raises here, at once
        if isinstance(prepared, SelfCheckResult):
            self.result = prepared
            return
        self._key = prepared[2]
        self._child = _fork(config, seed)

    def wait(self) -> SelfCheckResult | None:
        """The result (None when disabled).

        Raises:
            UnsupportedModelError: the self-check failed (exit 3).
        """
        if self.result is None and self._key is not None:
            got = None
            if self._child is not None:
                got, self._child = _collect(*self._child), None
            self.result = remember(self._key, got) if got is not None else check_adapter(self._config,
                                                                                            seed=self._seed)
        if self.result is not None and not self.result.ok:
            raise failure_error(self._config, self.result)
        return self.result

    def __enter__(self) -> AdapterCheck:
        return self

    def __exit__(self, kind, err, tb) -> bool:
        if kind is not None and not issubclass(kind, Exception):    # Ctrl-C, SystemExit: stop the child
            if self._child is not None:
                os.kill(self._child[0], signal.SIGKILL)
                _collect(*self._child)
                self._child = None
            return False
        if kind is None:
            self.wait()
            return False
        try:
            self.wait()
        except UnsupportedModelError as failed:
            raise failed from err
        return False


def _child_run(config: Any, seed: int) -> SelfCheckResult:
    """What the child computes (a seam for tests: the forked child sees the parent's patches)."""
    return check_adapter(config, seed=seed)


def _fork(config: Any, seed: int) -> tuple[int, int] | None:
    """Start the check in a forked child; ``(pid, read end of its result pipe)``, or None."""
    if not hasattr(os, "fork"):
        return None
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:                                            # the child: never returns
        code = 1
        try:
            os.close(r)
            null = os.open(os.devnull, os.O_WRONLY)
            os.dup2(null, 1)
            os.dup2(null, 2)
            data = json.dumps(dataclasses.asdict(_child_run(config, seed))).encode()
            while data:
                data = data[os.write(w, data):]
            code = 0
        finally:
            os._exit(code)
    os.close(w)
    return pid, r


def _collect(pid: int, r: int) -> SelfCheckResult | None:
    """Read the child's result and reap it; None when it died without one."""
    chunks = []
    with os.fdopen(r, "rb") as pipe:
        while chunk := pipe.read(65536):
            chunks.append(chunk)
    _, status = os.waitpid(pid, 0)
    if not os.WIFEXITED(status) or os.WEXITSTATUS(status) != 0:
        return None
    try:
        d = json.loads(b"".join(chunks))
        return SelfCheckResult(str(d["family"]), bool(d["ok"]), str(d["reason"]), float(d["record_max_abs"]),
                               float(d["prune_max_abs"]), float(d["seconds"]))
    except (ValueError, KeyError, TypeError):
        return None
