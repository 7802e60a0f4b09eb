"""`moeharden verify`: check a release's integrity, and with a baseline re-attack it and check the gate.

The whole attack suite of ``scan`` is run again on the hardened model — every attribution method
at every keep-count of the baseline, the random control, and the re-alignment attack with every
mode and strategy at the baseline's budget, over ≥ 3 seeds — and compared with the baseline
``scan.json`` through the gate (:mod:`moeharden.audit.gate`). When the checkpoint carries a moeharden
manifest, its signature and tensor hashes are checked too. ``verify.json`` is a
:class:`~moeharden.audit.verdict.VerifyDocument` holding every gate row with its measured value,
threshold and pass/fail. A failing gate is a result (``passed`` False), not an exception.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from moeharden.audit.documents import RecoverySections, ScanDocument, load_document, stamp
from moeharden.audit.verdict import BaselineRef, GateRow, IntegrityReport, VerifyDocument
from moeharden.errors import IntegrityError, UsageError

ALL_MODES = ("full", "router", "lora", "distill")
MIN_SEEDS = 3


@dataclass(frozen=True)
class VerifySettings:
    """Knobs of `moeharden verify`. ``baseline`` None: integrity only (needs ``pubkey``)."""

    baseline: Path | None = None        # the baseline scan.json: re-attack and check the gate
    out: Path | None = None             # where verify.json and its report go (needed with baseline)
    gate: Path | None = None            # gate YAML overriding data/gate-default.yaml
    pubkey: Path | None = None
    manifest: Path | None = None        # the original release's manifest (default: the checkpoint's own)
    modes: tuple[str, ...] = ALL_MODES
    recover_steps: int | None = None    # None: the baseline's steps per round
    workers: int = 1                    # processes for the ladder's curves
    trust_remote_code: bool = False


@dataclass
class VerifyResult:
    """The verify.json document and where it was written."""

    data: VerifyDocument
    out: Path | None

    @property
    def passed(self) -> bool:
        return self.data.passed

    def failing(self) -> list[GateRow]:
        return self.data.failing()

    def to_dict(self) -> dict[str, Any]:
        return {"out": str(self.out) if self.out else None, **self.data.summary()}


def describe_row(r: GateRow) -> str:
    """One human line for a gate row."""
    return r.describe()


def verify(ckpt: str, settings: VerifySettings) -> VerifyResult | IntegrityReport:
    """What `moeharden verify` runs: the integrity check alone, or the re-attack with the gate.

    Returns:
        an :class:`IntegrityReport` without a baseline, else a :class:`VerifyResult`.
    Raises:
        UsageError: neither ``pubkey`` nor ``baseline``, or ``baseline`` without ``out``.
        InputError, CheckpointError, ConfigFileError, IntegrityError.
    """
    if settings.baseline is None:
        if settings.pubkey is None:
            raise UsageError("verify needs --pubkey (integrity) and/or --baseline with --out (re-attack).")
        from moeharden.audit.integrity import verify_integrity

        return verify_integrity(Path(ckpt), pubkey=settings.pubkey, manifest=settings.manifest)
    if settings.out is None:
        raise UsageError("verify --baseline needs --out DIR for verify.json and its report.")
    return verify_attacks(ckpt, settings.baseline, settings.out, settings=settings)


def _integrity(path: Path, settings: VerifySettings) -> IntegrityReport | None:
    man = settings.manifest if settings.manifest is not None else (path / "moeharden-manifest.json")
    if Path(man).exists():
        if settings.pubkey is None:
            raise UsageError("The checkpoint carries a moeharden manifest; pass --pubkey to check its signature.")
        from moeharden.audit.integrity import verify_integrity

        return verify_integrity(path, pubkey=settings.pubkey, manifest=Path(man))
    if settings.manifest is not None:
        raise UsageError(f"Manifest {settings.manifest} does not exist.")
    return None


def _reattack_recovery(model, tokenizer, tasks, data: ScanDocument, base: ScanDocument,
                       settings: VerifySettings) -> RecoverySections | None:
    """The re-alignment attack at the baseline's settings (every mode), or None if the baseline ran none."""
    from moeharden.attack.realign.suite import SuiteSettings, recovery_suite

    rs = base.recovery_settings
    if rs is None:
        return None
    suite = SuiteSettings(
        modes=tuple(settings.modes), strategies=tuple(rs.strategies),
        seeds=tuple(rs.seeds) if len(rs.seeds) >= MIN_SEEDS else tuple(range(MIN_SEEDS)),
        budget=rs.budget, rounds=rs.rounds, steps_per_round=settings.recover_steps or rs.steps_per_round,
        lr=rs.lr, target_fraction=rs.target_fraction, keeps=rs.keeps)
    return RecoverySections.model_validate(recovery_suite(model, tokenizer, tasks, data.to_json(), suite))


def verify_attacks(ckpt: str, baseline: Path, out: Path, *, settings: VerifySettings | None = None) -> VerifyResult:
    """Re-attack ``ckpt``, compare with ``baseline`` (scan.json), write ``out/verify.json`` + report.

    Args:
        ckpt: the hardened checkpoint (local directory or Hub id).
        baseline: the baseline ``scan.json``.
        out: output directory (written atomically).
        settings: gate file, public key, manifest, modes, steps (``baseline``/``out`` fields are ignored).
    Returns:
        the result; ``passed`` is False when a gate row does not hold (the outputs are written either way).
    Raises:
        InputError (an invalid baseline), CheckpointError, ConfigFileError, IntegrityError, UsageError.
    """
    from moeharden.audit.gate import gate_rows, load_gate
    from moeharden.audit.report import render_verify
    from moeharden.audit.scan import ScanSettings, limit_tasks, model_identity, scan_model
    from moeharden.io.outputs import atomic_output_dir, check_output_dir
    from moeharden.model.checkpoint import load_model, load_tokenizer, resolve_checkpoint, validate_checkpoint
    from moeharden.model.registry import moe_layers
    from moeharden.tasks.resolve import load_tasks

    settings = settings or VerifySettings()
    base = load_document(baseline, ScanDocument)
    check_output_dir(out)          # fail now, not after minutes of work
    gate = load_gate(settings.gate)
    path = resolve_checkpoint(ckpt, validate=False)     # integrity first: a tampered release exits 4, not 3
    integrity = _integrity(path, settings)
    if integrity is not None and not integrity.ok:      # never attack weights that are not the signed release
        raise IntegrityError("; ".join(integrity.problems) + ".",
                             hint="The checkpoint is not the signed release; no attack was run on it.")
    validate_checkpoint(path)
    st = base.settings
    scan_settings = ScanSettings(methods=tuple(st.methods), keeps=tuple(st.keeps), ranking=st.ranking,
                                 limit=st.limit, train_limit=st.train_limit, seed=st.seed,
                                 random_seeds=max(MIN_SEEDS, st.random_seeds),
                                 search=any(r.method == "search" for r in base.sweep), ladder=False)
    tasks = limit_tasks(load_tasks([t.name for t in base.tasks] if not _own_tasks(path, base) else None,
                                   checkpoint_dir=path, limit=None, seed=None), st.limit, st.train_limit)
    names = {t.name for t in base.tasks}
    tasks = [t for t in tasks if t.name in names]       # the baseline's tasks, not the whole task file
    t0 = time.perf_counter()
    model = load_model(path, trust_remote_code=settings.trust_remote_code)
    tokenizer = load_tokenizer(path)
    identity = model_identity(path, model, moe_layers(model))
    data = scan_model(model, tokenizer, tasks, scan_settings, identity=identity)
    sections = _reattack_recovery(model, tokenizer, tasks, data, base, settings)
    if sections is not None:
        data = data.with_recovery(sections)
    if base.ladder is not None:          # the adaptive ladder with the baseline's plan and pruned shape
        from moeharden.attack.realign.ladder_suite import plan_from_dict
        from moeharden.audit.ladder import ladder_for_document

        plan = plan_from_dict(base.ladder.settings, workers=settings.workers)
        data.ladder = ladder_for_document(model, tokenizer, tasks, data, plan, checkpoint=path,
                                          keeps=dict(base.ladder.settings.get("keeps") or {}), reuse=base.ladder,
                                          trust_remote_code=settings.trust_remote_code)
    rows = gate_rows(gate, base, data, integrity=integrity)
    doc = VerifyDocument(**stamp(), checkpoint=identity, baseline=BaselineRef(path=str(baseline), model=base.model),
                         gate_settings=gate, gate=rows, passed=all(r.passed for r in rows), integrity=integrity,
                         attack=data, seconds=round(time.perf_counter() - t0, 2))
    with atomic_output_dir(out) as tmp:
        (tmp / "verify.json").write_text(json.dumps(doc.to_json(), indent=2) + "\n")
        render_verify(base, doc, tmp)
    return VerifyResult(doc, Path(out))


def _own_tasks(path: Path, base: ScanDocument) -> bool:
    """True when the baseline's tasks are the checkpoint's own task file (e.g. the demo model)."""
    f = path / "moeharden-tasks.yaml"
    if not f.exists():
        return False
    from moeharden.tasks.spec import read_task_file

    names = {t.name for t in read_task_file(f).tasks}
    return {t.name for t in base.tasks} <= names
