"""The CLI shell: start-up time, version, help listing, exit codes and the one error handler."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

from typer.testing import CliRunner

from moeharden import __version__
from moeharden.cli import app

runner = CliRunner()


def _best_of(argv, n=3):
    """Fastest of ``n`` runs: the start-up cost itself, not the load other test workers put on the machine."""
    best, proc = float("inf"), None
    for _ in range(n):
        t0 = time.perf_counter()
        proc = subprocess.run(argv, capture_output=True, text=True, env={**os.environ, "COLUMNS": "120"})
        best = min(best, time.perf_counter() - t0)
    return best, proc


def test_help_lists_every_command_and_starts_fast():
    elapsed, proc = _best_of([sys.executable, "-m", "moeharden", "--help"])
    assert proc.returncode == 0
    for cmd in ("scan", "prune", "entangle", "lock", "verify", "report", "demo"):
        assert cmd in proc.stdout
    # Against the interpreter starting with the CLI's own libraries (typer, rich, pydantic), measured
    # the same way beside it: under parallel tests a wall-clock bound fails on load, not on the CLI.
    base, _ = _best_of([sys.executable, "-c", "import typer, rich.console, pydantic"])
    assert elapsed < 1.5 or elapsed < 3.0 * base, f"--help took {elapsed:.2f} s ({base:.2f} s for its libraries)"


def test_help_does_not_import_torch():
    code = "import sys; from moeharden.cli import app; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip()
    assert out == "False"


def test_version():
    res = runner.invoke(app, ["--version"])
    assert res.exit_code == 0 and __version__ in res.output


def test_usage_error_is_exit_2():
    res = runner.invoke(app, ["prune"])          # missing argument and --out
    assert res.exit_code == 2


def test_report_on_missing_json_is_input_error(tmp_path):
    res = runner.invoke(app, ["report", str(tmp_path / "nope.json")])
    assert res.exit_code == 3
    assert "does not exist" in res.output
    assert "Traceback" not in res.output


def test_json_mode_error_document(tmp_path):
    bad = tmp_path / "scan.json"
    bad.write_text(json.dumps({"schema": "something/1"}))
    res = runner.invoke(app, ["--json", "report", str(bad)])
    assert res.exit_code == 3
    doc = json.loads(res.stdout)        # stdout holds only the JSON document; messages go to stderr
    assert doc["error"]["exit_code"] == 3 and "schema" in doc["error"]["message"]


def test_debug_env_shows_traceback(tmp_path, monkeypatch):
    monkeypatch.setenv("MOEHARDEN_DEBUG", "1")
    res = runner.invoke(app, ["report", str(tmp_path / "nope.json")])
    assert res.exit_code == 3
    assert "Traceback" in res.output
