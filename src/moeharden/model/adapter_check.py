"""The self-check run beside the command that will rewrite a checkpoint (:class:`AdapterCheck`).

:mod:`moeharden.model.selfcheck` is the check itself; this module runs it in a child process so
that its cost — mostly importing the family's modeling code — overlaps the command's own work
instead of preceding it, without ever publishing output before the check has passed.
"""

from __future__ import annotations

import json
from typing import Any

from moeharden.errors import UnsupportedModelError
from moeharden.model.selfcheck import SelfCheckResult, check_adapter, failure_error, prepare_check, remember


class AdapterCheck:
    """The self-check of one checkpoint's family, running beside the command that will rewrite it.

    Most of a cold self-check is importing the family's modeling code (about 4 s of the 4.4 s on
    the demo model, bench/selfcheck.py), which a streaming ``prune`` or ``lock`` never needs. So,
    unless the result is cached, the check runs in a child process on another core while the
    command reads and writes its *temporary* output; :meth:`wait` is called before anything is
    published, and a failure discards the temporary output (the checkpoint is only ever read, and
    ``--out`` is untouched). Used as a context manager: leaving the block waits for the check (so
    a failed self-check is the error reported, also when the command itself failed — a broken
    adapter may be why) or, on Ctrl-C, stops the child.

    Families whose config class is not transformers' own (remote code) are checked in-process,
    at :meth:`wait`. A child that dies without a result is replaced by the in-process check.
    """

    def __init__(self, config: Any, *, enabled: bool = True, seed: int = 0):
        self._config, self._seed, self._proc, self._key = config, seed, None, None
        self.result: SelfCheckResult | None = None
        if not enabled:
            return
        prepared = prepare_check(config, seed)          # an unsupported family raises here, at once
        if isinstance(prepared, SelfCheckResult):
            self.result = prepared
            return
        self._spec, _, self._key = prepared
        payload = _child_payload(config)
        if payload is not None:
            import subprocess
            import sys

            self._proc = subprocess.Popen([sys.executable, "-c", _CHILD], stdin=subprocess.PIPE,
                                          stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
            try:
                self._proc.stdin.write(payload)
                self._proc.stdin.close()
            except OSError:                          # the child is gone already: wait() runs it here
                pass

    def wait(self) -> SelfCheckResult | None:
        """The result (None when disabled).

        Raises:
            UnsupportedModelError: the self-check failed (exit 3).
        """
        if self.result is None and self._key is not None:
            got = None
            if self._proc is not None:
                with self._proc.stdout as pipe:       # the only pipe (stdin closed, stderr discarded)
                    out = pipe.read()
                self._proc.wait()
                got = _parse_child(out) if self._proc.returncode == 0 else None
                self._proc = None
            self.result = remember(self._key, got) if got is not None else check_adapter(self._config,
                                                                                            seed=self._seed)
        if self.result is not None and not self.result.ok:
            raise failure_error(self._config, self.result)
        return self.result

    def __enter__(self) -> AdapterCheck:
        return self

    def __exit__(self, kind, err, tb) -> bool:
        if kind is not None and not issubclass(kind, Exception):    # Ctrl-C, SystemExit: stop the child
            if self._proc is not None:
                self._proc.kill()
                self._proc.wait()
            return False
        if kind is None:
            self.wait()
            return False
        try:
            self.wait()
        except UnsupportedModelError as failed:
            raise failed from err
        return False


_CHILD = "from moeharden.model.adapter_check import _child_main; _child_main()"


def _child_payload(config: Any) -> str | None:
    """The config as the child rebuilds it (class path and values), or None when it cannot."""
    cls = type(config)
    if not cls.__module__.startswith("transformers."):
        return None
    try:
        return json.dumps({"module": cls.__module__, "name": cls.__name__,
                           "config": json.loads(config.to_json_string(use_diff=False))})
    except (TypeError, ValueError, AttributeError):
        return None


def _child_main() -> None:
    """In the child: read the payload from stdin, run the check, print the result as JSON."""
    import dataclasses
    import importlib
    import sys

    d = json.loads(sys.stdin.read())
    cfg = getattr(importlib.import_module(d["module"]), d["name"]).from_dict(d["config"])
    print(json.dumps(dataclasses.asdict(check_adapter(cfg))))


def _parse_child(out: str) -> SelfCheckResult | None:
    try:
        d = json.loads(out.strip().splitlines()[-1])
        return SelfCheckResult(str(d["family"]), bool(d["ok"]), str(d["reason"]), float(d["record_max_abs"]),
                               float(d["prune_max_abs"]), float(d["seconds"]))
    except (ValueError, KeyError, TypeError, IndexError):
        return None
