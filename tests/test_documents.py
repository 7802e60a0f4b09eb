"""Typed report documents: validation of hostile JSON, the gate on typed documents, schemas and the docs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from moeharden.audit.documents import ScanDocument, load_document, stamp
from moeharden.audit.gate import gate_rows
from moeharden.audit.records import ManifestDocument, PruneRecord
from moeharden.audit.schemas import DOCUMENTS, document_schema, render_markdown
from moeharden.audit.verdict import Gate, GateRow, IntegrityReport, VerifyDocument
from moeharden.cli import app
from moeharden.errors import InputError, IntegrityError, UsageError

runner = CliRunner()
DOCS = Path(__file__).resolve().parents[1] / "docs" / "report-fields.md"


def _identity() -> dict:
    return {"path": "/m", "name": "m", "family": "Mixtral", "model_type": "mixtral", "num_experts": 8, "top_k": 2,
            "moe_layers": [0, 1], "config_sha256": "c" * 64, "safetensors_digest": "d" * 64}


def _scan(full: float, sweep: list[dict], ltr: dict | None = None, *, metric: str = "accuracy") -> ScanDocument:
    point = {"keep": None, "retained": None, "method": None}
    raw = {"schema": "moeharden.scan/1", **{k: v for k, v in stamp().items()}, "model": _identity(),
           "settings": {"methods": ["reap"], "keeps": [8, 4, 2], "ranking": "per_layer", "limit": None, "seed": 0,
                        "random_seeds": 3},
           "tasks": [{"name": "t", "kind": "multiple_choice", "metric": metric, "full": full, "chance": 0.5,
                      "n_attribution": 4, "n_evaluation": 4}],
           "attribution": {"reap": {"t": [[0.0] * 8, [1.0] * 8]}}, "keep_sets": {},
           "sweep": [{"metric": 0.0, **r} for r in sweep],
           "headline": {"t": {"keep_25": point, "keep_50": point}}, "timings": {"sweep": 1.0}}
    if ltr is not None:
        raw |= {"recovery": [], "labels_to_recover": ltr, "recovery_saving": {},
                "recovery_settings": {"modes": ["full"], "strategies": ["random", "entropy"], "seeds": [0, 1, 2],
                                      "budget": 64, "rounds": 4, "steps_per_round": 30, "lr": 3e-4,
                                      "target_fraction": 0.95, "keeps": {"t": [2]}, "labels_axis": "labels"},
                "recovery_timing": {"select": 0.0, "train": 0.0}}
    return ScanDocument.model_validate(raw)


def _ladder(pruned: float | None, shared: float | None, *, top: int = 512, area: float = 0.0) -> dict:
    """A ladder section whose only task `t` has these labels-to-recover (pruned, shared) and area gap."""
    ref = lambda labels, a: {"runs": [], "labels": labels, "area": a}  # noqa: E731
    hs = {"labels": None if pruned is None or shared is None else shared - pruned,
          "labels_ratio": None if pruned is None or not shared else pruned / shared, "area": area,
          "pruned_labels": pruned, "reference_labels": shared}
    return {"settings": {}, "fingerprint": {}, "curves": [], "reused_scratch": False, "seconds": 0.0,
            "summary": {"t": {"target": 0.95, "attacks": {"labels": {
                "top": top, "references": {"pruned": ref(pruned, 0.5 + area), "shared": ref(shared, 0.5)},
                "expert_head_start": hs, "theft_head_start": None}}}}}


def _with(doc: ScanDocument, *, lo: float | None = None, ladder: dict | None = None) -> ScanDocument:
    raw = doc.to_json()
    if lo is not None:
        raw["tasks"][0] |= {"full_lo": lo, "full_hi": min(1.0, raw["tasks"][0]["full"] + 0.01)}
    if ladder is not None:
        raw["ladder"] = ladder
    return ScanDocument.model_validate(raw)


def test_gate_rows_pass_and_fail():
    base = _with(_scan(1.0, []), lo=0.99, ladder=_ladder(16.0, 64.0))
    bad = _with(_scan(0.97, [{"task": "t", "method": "reap", "keep": 2, "above_chance": 0.7, "retained": 0.9,
                              "above_chance_hi": 0.8},
                             {"task": "t", "method": "random", "keep": 4, "above_chance": 0.2, "retained": 0.6,
                              "seeds": [0, 1, 2], "std": 0.01}]), lo=0.96, ladder=_ladder(32.0, 64.0, area=0.2))
    rows = {(r.check, r.keep): r for r in gate_rows(Gate(), base, bad)}
    full = rows[("full_metric_fraction", None)]
    assert not full.passed and full.value == pytest.approx(0.96)     # the LOWER bound 0.96 ÷ 1.0 < 0.98
    worst = rows[("worst_above_chance_retained", 2)]
    assert not worst.passed and worst.value == pytest.approx(0.8)   # the conservative upper end, not 0.7
    assert rows[("worst_above_chance_retained", 4)].passed
    ltr = rows[("labels_to_recover", None)]
    assert not ltr.passed and ltr.threshold == 5 * 16 and ltr.value == 32   # 32 < 5 x 16
    hs = rows[("expert_head_start", None)]
    assert not hs.passed and hs.value == pytest.approx(0.5) and hs.area == pytest.approx(0.2)   # 32/64 < 0.8
    good = _with(_scan(0.99, [{"task": "t", "method": "reap", "keep": 2, "above_chance": 0.1, "retained": 0.55,
                               "above_chance_hi": 0.3}]), lo=0.985, ladder=_ladder(None, 64.0, area=0.01))
    assert all(r.passed and r.status == "pass" for r in gate_rows(Gate(), base, good))


def test_not_recovered_below_the_threshold_is_inconclusive():
    base = _with(_scan(1.0, []), lo=0.99, ladder=_ladder(16.0, 64.0))
    short = _with(_scan(0.99, []), lo=0.985, ladder=_ladder(None, 64.0, top=64))     # ladder stops below 80
    row = next(r for r in gate_rows(Gate(), base, short) if r.check == "labels_to_recover")
    assert row.status == "inconclusive" and not row.passed
    row = next(r for r in gate_rows(Gate(allow_inconclusive=True), base, short) if r.check == "labels_to_recover")
    assert row.status == "inconclusive" and row.passed
    no_ladder = _with(_scan(1.0, []), lo=0.99)
    row = next(r for r in gate_rows(Gate(), no_ladder, short) if r.check == "labels_to_recover")
    assert row.status == "inconclusive" and not row.passed          # nothing to compare against: no silent pass


def _curve(rungs: list[int], metrics: list[float]) -> dict:
    pts = [{"x": x, "metric": m, "lo": None, "hi": None, "val_metric": None, "lr": None, "schedule": None,
            "steps": 0, "total_steps": 0, "labels_read": 0} for x, m in zip(rungs, metrics, strict=True)]
    return {"task": "t", "reference": "pruned", "attack": "labels", "mode": "full", "strategy": "random",
            "seed": 0, "keep": 2, "points": pts, "seconds": 0.0}


@pytest.mark.parametrize(("recovered_at", "passes"), [(128, False), (256, True), (64, False)])
def test_labels_to_recover_compares_the_rung_below(recovered_at, passes):
    """Recovering at rung r proves only that the attacker needed more than the rung below r: with a
    threshold of 80 and rungs 64, 128, a recovery at 128 may have needed 65 labels — not a pass."""
    rungs = [0, 16, 32, 64, 128, 256, 512]
    base = _with(_scan(1.0, []), lo=0.99, ladder=_ladder(16.0, 64.0))
    lad = _ladder(float(recovered_at), 64.0, area=0.0)
    lad["curves"] = [_curve(rungs, [1.0 if x >= recovered_at else 0.0 for x in rungs])]
    hard = _with(_scan(0.99, []), lo=0.985, ladder=lad)
    row = next(r for r in gate_rows(Gate(), base, hard) if r.check == "labels_to_recover")
    below = max(x for x in rungs if x < recovered_at)
    assert row.threshold == 80 and row.value == recovered_at and row.passed is passes
    assert (row.lo, row.hi) == (below + 1, recovered_at)


def test_perplexity_gate_fraction_is_baseline_over_hardened():
    base, hard = _scan(10.0, [], metric="perplexity"), _scan(12.5, [], metric="perplexity")
    (row,) = gate_rows(Gate(), base, hard)
    assert row.value == pytest.approx(0.8) and not row.passed       # 10 / 12.5: lower is better


def test_gate_row_json_keeps_the_on_disk_names():
    row = GateRow(check="manifest_integrity", task=None, value=True, threshold=True, op="==", passed=True)
    assert row.to_json() == {"check": "manifest_integrity", "task": None, "value": True, "threshold": True,
                             "op": "==", "pass": True, "status": "pass"}
    assert GateRow.model_validate(row.to_json()) == row


def test_scan_document_round_trips_and_omits_absent_sections(tmp_path):
    doc = _scan(1.0, [{"task": "t", "method": "reap", "keep": 2, "above_chance": 0.1, "retained": 0.5},
                      {"task": "t", "method": "random", "keep": 2, "above_chance": 0.0, "retained": 0.5,
                       "seeds": [0, 1, 2], "std": 0.1}])
    raw = doc.to_json()
    assert "recovery" not in raw and "recovery_settings" not in raw
    assert "seeds" not in raw["sweep"][0] and raw["sweep"][1]["seeds"] == [0, 1, 2]
    (tmp_path / "scan.json").write_text(json.dumps(raw))
    assert load_document(tmp_path / "scan.json", ScanDocument) == doc


def _write(tmp_path: Path, text: str | bytes) -> Path:
    p = tmp_path / "scan.json"
    p.write_bytes(text if isinstance(text, bytes) else text.encode())
    return p


def _good() -> dict:
    return _scan(1.0, []).to_json()


HOSTILE = {
    "not json": "{not json",
    "a list": "[1, 2, 3]",
    "other schema": json.dumps({**_good(), "schema": "moeharden.verify/1"}),
    "no schema": json.dumps({k: v for k, v in _good().items() if k != "schema"}),
    "missing keys": json.dumps({"schema": "moeharden.scan/1"}),
    "wrong types": json.dumps({**_good(), "tasks": "everything", "sweep": [{"task": 1}], "model": []}),
    "extra key": json.dumps({**_good(), "surprise": 1}),
    "deep nesting": '{"schema": "moeharden.scan/1", "model": ' + "[" * 100_000 + "]" * 100_000 + "}",
    "deep nesting, no schema": "[" * 100_000 + "]" * 100_000,
    "not utf-8": b"\xff\xfe{\x00",
    "empty": "",
}


@pytest.mark.parametrize("case", list(HOSTILE))
def test_hostile_scan_json_is_an_input_error(tmp_path, case):
    path = _write(tmp_path, HOSTILE[case])
    with pytest.raises(InputError) as info:
        load_document(path, ScanDocument)
    assert "\n" not in info.value.message and str(path) in info.value.message
    res = runner.invoke(app, ["report", str(path)])
    assert res.exit_code == 3, res.output
    assert "Internal error" not in res.output and "Traceback" not in res.output


def test_wrong_types_are_listed_with_their_paths(tmp_path):
    with pytest.raises(InputError) as info:
        load_document(_write(tmp_path, HOSTILE["wrong types"]), ScanDocument)
    for where in ("tasks", "sweep[0].task", "model"):
        assert where in info.value.message


def test_a_directory_is_an_input_error(tmp_path):
    with pytest.raises(InputError, match="is a directory"):
        load_document(tmp_path, ScanDocument)
    assert runner.invoke(app, ["report", str(tmp_path), str(tmp_path)]).exit_code == 3


def test_manifest_errors_can_be_integrity_errors(tmp_path):
    p = tmp_path / "m.json"
    p.write_text(json.dumps({"schema": "moeharden.manifest/1", "tensors": {"a": {"file": 1}}}))
    with pytest.raises(IntegrityError):
        load_document(p, ManifestDocument, error=IntegrityError)


def test_prune_record_reads_its_current_shape(tmp_path):
    raw = {"schema": "moeharden.prune/1", "tool": {"name": "moeharden", "version": "0"},
           "source": {"path": "/m", "safetensors_digest": "d"}, "num_experts_before": 8, "num_experts_after": 2,
           "keep": {"0": [1, 5], "1": [0, 2]}}
    (tmp_path / "p.json").write_text(json.dumps(raw))
    assert load_document(tmp_path / "p.json", PruneRecord).to_json() == raw


def test_side_records_are_their_producers_models_and_strict_again(tmp_path):
    """audit.records re-uses the models the producers build; an unknown top-level key is an input error."""
    from moeharden.attack import records as attack_records
    from moeharden.audit import records
    from moeharden.defend import lock
    from moeharden.defend.entangle import record as entangle_record

    assert records.PruneRecord is attack_records.PruneRecord
    assert records.EntangleRecord is entangle_record.EntangleRecord
    assert records.ManifestDocument is lock.ManifestDocument
    assert DOCUMENTS["prune"][0] is attack_records.PruneRecord
    raw = {"schema": "moeharden.prune/1", "tool": {"name": "moeharden", "version": "0"},
           "source": {"path": "/m", "safetensors_digest": "d"}, "num_experts_before": 8, "num_experts_after": 2,
           "keep": {"0": [1, 5]}, "smuggled": 1}
    (tmp_path / "p.json").write_text(json.dumps(raw))
    with pytest.raises(InputError, match="smuggled"):
        load_document(tmp_path / "p.json", PruneRecord)
    entangle = {"schema": "moeharden.entangle/1", "tool": {"name": "moeharden", "version": "0"},
                "source": {"path": "/m", "safetensors_digest": "d"}, "tasks": ["t"], "recipe": {"steps": 1},
                "history": [{"step": 1, "retain": 0.5}], "seconds": 1.0}
    (tmp_path / "e.json").write_text(json.dumps(entangle))
    assert load_document(tmp_path / "e.json", records.EntangleRecord).to_json() == entangle
    (tmp_path / "e.json").write_text(json.dumps({**entangle, "extra": True}))
    with pytest.raises(InputError, match="extra"):
        load_document(tmp_path / "e.json", records.EntangleRecord)


def test_prune_writes_exactly_its_record(tiny_mixtral_ckpt, tmp_path):
    """The record prune writes validates strictly and holds the digest and keep-set, computed here apart."""
    from moeharden.attack.prune import prune_checkpoint
    from moeharden.model.checkpoint import checkpoint_digest

    prune_checkpoint(tiny_mixtral_ckpt, tmp_path / "out", {0: [6, 1], 1: [0, 7]}, source_label="my/src")
    raw = json.loads((tmp_path / "out" / "moeharden-prune.json").read_text())
    assert set(raw) == {"schema", "tool", "source", "num_experts_before", "num_experts_after", "keep"}
    rec = load_document(tmp_path / "out" / "moeharden-prune.json", PruneRecord)
    assert rec.source.path == "my/src" and rec.source.safetensors_digest == checkpoint_digest(tiny_mixtral_ckpt)
    assert (rec.num_experts_before, rec.num_experts_after) == (8, 2)
    assert rec.keep == {"0": [1, 6], "1": [0, 7]} and rec.recovery is None


def test_verify_document_holds_a_scan_and_gate_rows():
    scan = _scan(1.0, [])
    doc = VerifyDocument(**stamp(), checkpoint=scan.model, baseline={"path": "b.json", "model": scan.model},
                         gate_settings=Gate(), gate=gate_rows(Gate(), scan, scan), passed=True, integrity=None,
                         attack=scan, seconds=1.0)
    again = VerifyDocument.model_validate(json.loads(json.dumps(doc.to_json())))
    assert again == doc and again.attack.tasks[0].name == "t"
    assert again.to_json()["gate"][0]["pass"] is True
    assert IntegrityReport(checkpoint="c", manifest="m").ok


def test_schema_command_prints_each_json_schema():
    for name in DOCUMENTS:
        res = runner.invoke(app, ["schema", name])
        assert res.exit_code == 0, res.output
        assert json.loads(res.stdout) == document_schema(name)
    props = document_schema("scan")["properties"]
    assert {"schema", "model", "sweep", "headline", "recovery_settings"} <= set(props)
    assert document_schema("verify")["properties"]["attack"]["$ref"].endswith("/ScanDocument")
    with pytest.raises(UsageError):
        document_schema("nope")
    assert runner.invoke(app, ["schema", "nope"]).exit_code == 2


def test_every_field_has_a_description():
    for name in DOCUMENTS:
        schema = document_schema(name)
        for node in [schema, *schema.get("$defs", {}).values()]:
            for field, s in node.get("properties", {}).items():
                assert s.get("description"), (name, node.get("title"), field)


def test_report_fields_doc_is_generated_from_the_schemas():
    expected = render_markdown()
    assert DOCS.read_text() == expected, ("docs/report-fields.md drifted from the document models; "
                                          "regenerate: moeharden schema --markdown > docs/report-fields.md")
    res = runner.invoke(app, ["schema", "--markdown"])
    assert res.exit_code == 0 and res.stdout == expected


@pytest.mark.parametrize("name", ["[bold]x[/bold].json", "a[/]b.json", "[red]"])
def test_markup_in_a_path_prints_as_written(tmp_path, name):
    res = runner.invoke(app, ["report", str(tmp_path / name)])
    assert res.exit_code == 3, res.output
    assert name in res.output.replace("\n", "")


def test_keygen_is_a_command_and_lock_keygen_still_works(tmp_path):
    res = runner.invoke(app, ["keygen", "--out", str(tmp_path / "a")])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "a" / "moeharden.key").exists() and (tmp_path / "a" / "moeharden.pub").exists()
    res = runner.invoke(app, ["lock", "keygen", "--out", str(tmp_path / "b"), "--json"])
    assert res.exit_code == 0, res.output
    assert Path(json.loads(res.stdout)["public_key"]).exists()
