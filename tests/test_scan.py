"""`moeharden scan` end to end on the embedded demo model, and the report rendered from JSON alone."""

from __future__ import annotations

import base64
import json
import re
import shutil
import subprocess

import pytest
from typer.testing import CliRunner

from moeharden.cli import app

runner = CliRunner()


@pytest.fixture(scope="module")
def demo_scan(tmp_path_factory):
    from moeharden.demo.build import build_demo_model

    root = tmp_path_factory.mktemp("scan")
    model = build_demo_model(root / "model")          # trained once per machine, then cached
    res = runner.invoke(app, ["scan", str(model), "--out", str(root / "scan"), "--recover", "--no-ladder", "--json"])
    assert res.exit_code == 0, res.output
    return root, json.loads((root / "scan" / "scan.json").read_text())


@pytest.mark.slow
def test_demo_reproduces_the_papers_finding(demo_scan):
    _, data = demo_scan
    assert data["schema"] == "moeharden.scan/1" and data["tool"]["version"]
    assert {t["name"] for t in data["tasks"]} == {"sentiment", "addition", "reverse"}
    for t in data["tasks"]:
        rows = [r for r in data["sweep"] if r["task"] == t["name"] and r["keep"] == 2]
        best = max((r for r in rows if r["method"] != "random"), key=lambda r: r["retained"])
        rnd = next(r for r in rows if r["method"] == "random")
        assert best["retained"] >= 0.9, (t["name"], best)
        assert best["retained"] - rnd["retained"] >= 0.2, (t["name"], best, rnd)
        assert len(rnd["seeds"]) >= 3
    for m in ("frequency", "gate", "reap", "ean", "soft", "contrastive", "ablation"):
        mat = data["attribution"][m]["sentiment"]
        assert len(mat) == len(data["model"]["moe_layers"]) and len(mat[0]) == 8
    # re-alignment attack ran with every strategy, >= 3 seeds, within the budget
    rec = data["recovery"]
    assert {r["strategy"] for r in rec} == {"random", "entropy", "margin", "kcenter"}
    assert max(r["labels"] for r in rec) <= data["recovery_settings"]["budget"]
    assert len({r["seed"] for r in rec}) >= 3
    assert set(data["labels_to_recover"]) == {"sentiment", "addition", "reverse"}


@pytest.mark.slow
def test_report_rerenders_from_json_alone(demo_scan, tmp_path):
    root, data = demo_scan
    (tmp_path / "scan.json").write_text(json.dumps(data))     # nothing else beside it
    res = runner.invoke(app, ["report", str(tmp_path / "scan.json")])
    assert res.exit_code == 0, res.output
    html = (tmp_path / "report.html").read_text()
    pngs = re.findall(r'src="data:image/png;base64,([^"]+)"', html)
    # per task: sweep curves + heatmaps + at least one recovery plot
    assert len(pngs) >= 3 * len(data["tasks"])
    for p in pngs:
        assert base64.b64decode(p)[:8] == b"\x89PNG\r\n\x1a\n"
    md = (tmp_path / "report.md").read_text()
    for t in data["tasks"]:
        assert t["name"] in md
    assert (root / "scan" / "report.html").read_text().count("<img") == html.count("<img")


@pytest.mark.slow
def test_report_renders_in_headless_chromium(demo_scan, tmp_path):
    chromium = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if chromium is None:
        pytest.skip("no headless Chromium on this machine (apt-get install chromium)")
    root, _ = demo_scan
    shot = tmp_path / "report.png"
    subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                    "--disable-background-networking", "--disable-component-update", "--disable-sync",
                    f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1200,2400",
                    f"--screenshot={shot}", (root / "scan" / "report.html").as_uri()],
                   capture_output=True, timeout=120)
    assert shot.exists() and shot.stat().st_size > 50_000     # a page with plots, not a blank one
