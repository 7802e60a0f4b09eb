"""`moeharden verify --baseline`: re-attack a hardened checkpoint and check the release gate.

The whole attack suite of ``scan`` is run again on the hardened model — every attribution method
at every keep-count of the baseline, the random control, and the re-alignment attack with every
mode and strategy at the baseline's budget, over ≥ 3 seeds — and compared with the baseline
``scan.json`` through the gate (:mod:`moeharden.audit.gate`). When the checkpoint carries a moeharden
manifest, its signature and tensor hashes are checked too. ``verify.json`` (schema
``moeharden.verify/1``) holds every gate row with its measured value, threshold and pass/fail.
"""

from __future__ import annotations

import datetime as _dt
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from moeharden import __version__
from moeharden.errors import UsageError, VerificationFailed

SCHEMA = "moeharden.verify/1"
ALL_MODES = ("full", "router", "lora", "distill")


@dataclass
class VerifyResult:
    """The verify.json document and where it was written."""

    data: dict[str, Any]
    out: Path | None

    @property
    def passed(self) -> bool:
        return bool(self.data["passed"])

    def failing(self) -> list[dict]:
        return [r for r in self.data["gate"] if not r["pass"]]

    def to_dict(self) -> dict[str, Any]:
        return {"out": str(self.out) if self.out else None, "passed": self.passed, "gate": self.data["gate"],
                "integrity": self.data.get("integrity")}


def describe_row(r: dict) -> str:
    """One human line for a gate row."""
    where = f"task {r['task']}" if r.get("task") else "checkpoint"
    extra = "".join(f", {k}={r[k]}" for k in ("keep", "attack") if r.get(k) is not None)
    return f"{r['check']} ({where}{extra}): {r['value']} {r['op']} {r['threshold']}"


def verify_attacks(ckpt: str, baseline: Path, out: Path, *, gate_path: Path | None = None,
                   pubkey: Path | None = None, manifest: Path | None = None, modes=ALL_MODES,
                   recover_steps: int | None = None, trust_remote_code: bool = False,
                   raise_on_fail: bool = True) -> VerifyResult:
    """Re-attack ``ckpt``, compare with ``baseline`` (scan.json), write ``out/verify.json`` + report.

    Raises:
        VerificationFailed: a gate row does not hold (after writing the outputs), if ``raise_on_fail``.
        InputError, CheckpointError, ConfigFileError, IntegrityError.
    """
    from moeharden.attack.realign import DEFAULT_SMALL_BUDGET, recovery_suite
    from moeharden.audit.gate import gate_rows, load_gate
    from moeharden.audit.report import load_report_json, render_verify
    from moeharden.audit.scan import ScanSettings, model_identity, scan_model
    from moeharden.io.shards import atomic_output_dir
    from moeharden.model.checkpoint import load_model, load_tokenizer, resolve_checkpoint
    from moeharden.model.registry import moe_layers
    from moeharden.tasks.loading import load_tasks

    base = load_report_json(baseline, "moeharden.scan/")
    from moeharden.io.shards import check_output_dir

    check_output_dir(out)          # fail now, not after minutes of work
    gate = load_gate(gate_path)
    path = resolve_checkpoint(ckpt)
    integrity = None
    man = manifest if manifest is not None else (path / "moeharden-manifest.json")
    if Path(man).exists():
        if pubkey is None:
            raise UsageError("The checkpoint carries a moeharden manifest; pass --pubkey to check its signature.")
        from moeharden.audit.integrity import verify_integrity

        integrity = verify_integrity(path, pubkey=pubkey, manifest=Path(man), raise_on_fail=False).to_dict()
    elif manifest is not None:
        raise UsageError(f"Manifest {manifest} does not exist.")
    st = base["settings"]
    settings = ScanSettings(methods=tuple(st["methods"]), keeps=tuple(st["keeps"]), ranking=st["ranking"],
                            limit=st.get("limit"), seed=st.get("seed", 0),
                            random_seeds=max(3, st.get("random_seeds", 3)))
    tasks = load_tasks([t["name"] for t in base["tasks"]] if not _own_tasks(path, base) else None,
                       checkpoint_dir=path, limit=settings.limit, seed=None)
    t0 = time.perf_counter()
    model = load_model(path, trust_remote_code=trust_remote_code)
    tokenizer = load_tokenizer(path)
    identity = model_identity(path, model, moe_layers(model))
    data = scan_model(model, tokenizer, tasks, settings, identity=identity)
    rs = base.get("recovery_settings")
    if rs:
        data.update(recovery_suite(
            model, tokenizer, tasks, data, modes=modes, strategies=tuple(rs["strategies"]),
            seeds=tuple(rs["seeds"]) if len(rs["seeds"]) >= 3 else (0, 1, 2),
            budget=rs.get("budget", DEFAULT_SMALL_BUDGET), rounds=rs.get("rounds", 4),
            steps_per_round=recover_steps or rs.get("steps_per_round", 30), lr=rs.get("lr", 3e-4),
            target_fraction=rs.get("target_fraction", 0.95), keeps=rs.get("keeps")))
    rows = gate_rows(gate, base, data, integrity=integrity)
    doc = {
        "schema": SCHEMA, "tool": {"name": "moeharden", "version": __version__},
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "checkpoint": identity, "baseline": {"path": str(baseline), "model": base.get("model")},
        "gate_settings": gate.model_dump(), "gate": rows, "passed": all(r["pass"] for r in rows),
        "integrity": integrity, "attack": data, "seconds": round(time.perf_counter() - t0, 2),
    }
    with atomic_output_dir(out) as tmp:
        (tmp / "verify.json").write_text(json.dumps(doc, indent=2) + "\n")
        render_verify(base, doc, tmp)
    result = VerifyResult(doc, Path(out))
    if raise_on_fail and not result.passed:
        raise VerificationFailed(
            f"{len(result.failing())} of {len(rows)} gate rows failed; see {Path(out) / 'verify.json'}.",
            hint="The hardened model is still prunable or lost quality; the gate is not loosened to pass.",
            rows=[describe_row(r) for r in result.failing()])
    return result


def _own_tasks(path: Path, base: dict) -> bool:
    """True when the baseline's tasks are the checkpoint's own task file (e.g. the demo model)."""
    f = path / "moeharden-tasks.yaml"
    if not f.exists():
        return False
    from moeharden.tasks.loading import read_task_file

    names = {t.name for t in read_task_file(f).tasks}
    return {t["name"] for t in base["tasks"]} <= names
