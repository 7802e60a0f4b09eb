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


def test_help_lists_every_command_and_starts_fast():
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "moeharden", "--help"], capture_output=True, text=True,
                          env={**os.environ, "COLUMNS": "120"})
    elapsed = time.perf_counter() - t0
    assert proc.returncode == 0
    for cmd in ("scan", "prune", "entangle", "lock", "verify", "report", "demo"):
        assert cmd in proc.stdout
    assert elapsed < 1.5, f"--help took {elapsed:.2f} s"


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
