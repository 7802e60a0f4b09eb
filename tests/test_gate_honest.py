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


@pytest.fixture(scope="module")
def plain_verify(at_chance):
    """verify of the model at chance against its scan: ``(exit code, output, verify directory)``."""
    root, model, _ = at_chance
    res = runner.invoke(app, ["verify", str(model), "--baseline", str(root / "scan" / "scan.json"),
                              "--out", str(root / "v")])
    return res.exit_code, res.output, root / "v"


def test_model_at_chance_gives_inconclusive_rows_and_exit_1(at_chance, plain_verify, tmp_path):
    root, model, _ = at_chance
    code, output, v = plain_verify
    assert code == 1, output
    rows = json.loads((v / "verify.json").read_text())["gate"]
    inconclusive = [r for r in rows if r["status"] == "inconclusive"]
    assert inconclusive and all(not r["pass"] for r in inconclusive)
    assert {r["check"] for r in inconclusive} >= {"labels_to_recover", "expert_head_start"}
    assert all("chance" in r["note"] for r in inconclusive if r["check"] in ("labels_to_recover", "expert_head_start"))
    # the scratch curves were reused from the baseline (same architecture, splits and plan)
    assert json.loads((v / "verify.json").read_text())["attack"]["ladder"]["reused_scratch"] is True
    # an explicit allowance lets inconclusive rows pass (and nothing else changes)
    gate = tmp_path / "gate.yaml"
    gate.write_text("allow_inconclusive: true\n")
    res = runner.invoke(app, ["verify", str(model), "--baseline", str(root / "scan" / "scan.json"),
                              "--out", str(tmp_path / "v2"), "--gate", str(gate)])
    rows2 = json.loads((tmp_path / "v2" / "verify.json").read_text())["gate"]
    assert res.exit_code == (0 if all(r["pass"] for r in rows2) else 1), res.output
    assert all(r["pass"] for r in rows2 if r["status"] == "inconclusive")
    assert [r["status"] for r in rows2] == [r["status"] for r in rows]


def test_null_seeds_measures_each_head_start_row_at_the_limit(at_chance, plain_verify, tmp_path):
    """verify --null-seeds: too few seeds is refused before any work (exit 2); otherwise the section's
    fail rates and areas equal an independent computation over every split of its own curves, and the
    gate's rows are those of a verify without it."""
    import itertools
    import statistics

    root, model, _ = at_chance
    base = str(root / "scan" / "scan.json")
    res = runner.invoke(app, ["verify", str(model), "--baseline", base, "--out", str(tmp_path / "few"),
                              "--null-seeds", "5"])
    assert res.exit_code == 2 and "at least 6" in res.output and not (tmp_path / "few").exists()
    res = runner.invoke(app, ["verify", str(model), "--baseline", base, "--out", str(tmp_path / "v"),
                              "--null-seeds", "6"])
    assert res.exit_code == 1, res.output
    doc = json.loads((tmp_path / "v" / "verify.json").read_text())
    assert doc["gate"] == json.loads((plain_verify[2] / "verify.json").read_text())["gate"]   # verdict unchanged
    null = doc["head_start_null"]
    assert null["seeds"] == 6 and {c["reference"] for c in null["curves"]} == {"shared"}
    assert sorted({c["seed"] for c in null["curves"]}) == list(range(1000, 1006))      # none of the plan's seeds
    lad = doc["attack"]["ladder"]
    frac, gate = lad["settings"]["target_fraction"], doc["gate_settings"]
    full = {t["name"]: t["full"] for t in doc["attack"]["tasks"]}
    assert {(r["task"], r["attack"]) for r in null["rows"]} == {("sentiment", "labels"), ("sentiment", "distill")}
    for row in null["rows"]:
        target = frac * full[row["task"]]                  # accuracy: higher is better
        curves = {c["seed"]: c for c in null["curves"] if c["task"] == row["task"] and c["attack"] == row["attack"]}

        def area(c):
            return sum(p["metric"] for p in c["points"]) / len(c["points"])

        def first(c, target=target):
            return next((p["x"] for p in c["points"] if p["metric"] >= target), None)

        fails, areas = 0, []
        for ref in itertools.combinations(sorted(curves), 3):
            pruned = [s for s in curves if s not in ref]          # the three other seeds
            a = round(max(area(curves[s]) for s in pruned) - sum(area(curves[s]) for s in ref) / 3, 6)
            got = [first(curves[s]) for s in pruned if first(curves[s]) is not None]
            p = min(got) if got else None
            m = statistics.median([float("inf") if first(curves[s]) is None else first(curves[s]) for s in ref])
            s = None if m == float("inf") else m
            labels_ok = True if p is None else (False if s is None else
                                                 (1.0 if s == 0 and p == 0 else (p / s if s else 0.0))
                                                 >= gate["expert_head_start_min_labels_ratio"])
            fails += not (labels_ok and a <= gate["expert_head_start_max_area"])
            areas.append(a)
        assert row["trials"] == len(areas) == 20
        assert row["fail_rate"] == pytest.approx(fails / 20)
        assert row["area_max"] == pytest.approx(max(areas)) and row["area_median"] == pytest.approx(statistics.median(areas))
        measured = lad["summary"][row["task"]]["attacks"][row["attack"]]["expert_head_start"]["area"]
        assert row["measured_area"] == pytest.approx(measured) and row["beyond_null"] == (measured > max(areas))
    assert "physical limit" in (tmp_path / "v" / "report.md").read_text()
