"""The honest gate end to end on a model at chance: intervals everywhere, the ladder's references,
inconclusive rows that fail the gate (exit 1) unless the gate file allows them."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from moeharden.attack.realign.ladder import LadderSettings
from moeharden.attack.realign.ladder_suite import AttackPlan
from moeharden.cli import app

runner = CliRunner()
TINY = AttackPlan(seeds=(0, 1, 2), validation_size=8, strategies=("random",),
                  ladder=LadderSettings(rungs=(0, 8, 16), prompt_rungs=(0, 8, 16), lrs=(1e-3, 3e-3), steps=(2, 4),
                                        batch_size=4))


@pytest.fixture(scope="module")
def at_chance(tmp_path_factory):
    """A demo-format model trained for 30 steps (at chance on every task) and its scan with a tiny ladder."""
    from moeharden.audit.scan import ScanSettings, scan
    from moeharden.demo import build as demo

    root = tmp_path_factory.mktemp("chance")
    model = demo.build_demo_model(root / "model", steps=30)
    # sentiment only (multiple choice): an untrained model's greedy generations run to the token cap
    res = scan(str(model), root / "scan", tasks=[f"{model / 'moeharden-tasks.yaml'}#sentiment"],
               settings=ScanSettings(limit=32, train_limit=64, ladder=True, plan=TINY, methods=("frequency", "reap")))
    return root, model, res.data


def test_scan_carries_intervals_and_three_references(at_chance):
    _, _, doc = at_chance
    for t in doc.tasks:
        assert t.full_lo is not None and t.full_lo <= t.full <= t.full_hi
    for r in doc.sweep:
        if r.pruned_lo is not None:
            assert r.pruned_lo <= r.metric + 1e-9 and r.metric <= r.pruned_hi + 1e-9
    assert any(r.method == "search" for r in doc.sweep)
    refs = {(c.task, c.reference, c.attack) for c in doc.ladder.curves}
    for t in doc.tasks:
        for ref in ("pruned", "shared", "scratch"):
            for attack in ("labels", "distill"):
                assert (t.name, ref, attack) in refs
    assert len({c.seed for c in doc.ladder.curves}) == 3
    for c in doc.ladder.curves:
        assert all(p.labels_read <= p.x for p in c.points)
        assert all(p.lr in TINY.ladder.lrs for p in c.points[1:])


def test_model_at_chance_gives_inconclusive_rows_and_exit_1(at_chance, tmp_path):
    root, model, _ = at_chance
    res = runner.invoke(app, ["verify", str(model), "--baseline", str(root / "scan" / "scan.json"),
                              "--out", str(tmp_path / "v")])
    assert res.exit_code == 1, res.output
    rows = json.loads((tmp_path / "v" / "verify.json").read_text())["gate"]
    inconclusive = [r for r in rows if r["status"] == "inconclusive"]
    assert inconclusive and all(not r["pass"] for r in inconclusive)
    assert {r["check"] for r in inconclusive} >= {"labels_to_recover", "expert_head_start"}
    assert all("chance" in r["note"] for r in inconclusive if r["check"] in ("labels_to_recover", "expert_head_start"))
    # the scratch curves were reused from the baseline (same architecture, splits and plan)
    assert json.loads((tmp_path / "v" / "verify.json").read_text())["attack"]["ladder"]["reused_scratch"] is True
    # an explicit allowance lets inconclusive rows pass (and nothing else changes)
    gate = tmp_path / "gate.yaml"
    gate.write_text("allow_inconclusive: true\n")
    res = runner.invoke(app, ["verify", str(model), "--baseline", str(root / "scan" / "scan.json"),
                              "--out", str(tmp_path / "v2"), "--gate", str(gate)])
    rows2 = json.loads((tmp_path / "v2" / "verify.json").read_text())["gate"]
    assert all(r["pass"] for r in rows2 if r["status"] == "inconclusive")
    assert [r["status"] for r in rows2] == [r["status"] for r in rows]
