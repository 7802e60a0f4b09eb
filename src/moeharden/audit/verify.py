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
import os
import shlex
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
    tasks: tuple[str, ...] = ()         # --task values (default: the checkpoint's own file, else the baseline's)
    null_seeds: int = 0                 # > 0: each expert-head-start row at the physical limit (audit/gate_null.py)


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


def _check_null_seeds(seeds: int, base: ScanDocument) -> None:
    """``--null-seeds`` needs a baseline with a ladder and two disjoint groups of the plan's seeds.

    Raises:
        UsageError: before any work.
    """
    if not seeds:
        return
    if base.ladder is None:
        raise UsageError("--null-seeds needs a baseline scanned with the ladder (scan --ladder): the null "
                         "repeats its plan.", hint="Run scan with --ladder, or leave out --null-seeds.")
    n = len(base.ladder.settings.get("seeds") or ())
    if seeds < 2 * n:
        raise UsageError(f"--null-seeds {seeds} is too few: the null splits its curves into two disjoint groups "
                         f"of the plan's {n} seed(s), so it needs at least {2 * n}.",
                         hint=f"Pass --null-seeds {2 * n} or more (9 for the demo's plan: 1,680 trials per row).")


def _head_start_null(model, tokenizer, tasks, data: ScanDocument, plan, settings: VerifySettings, gate, *,
                     checkpoint, journal_dir=None):
    """The typed ``head_start_null`` section (:func:`moeharden.audit.gate_null.head_start_null`) on the
    ladder's own keep-sets and pruned shape."""
    from moeharden.audit.gate_null import head_start_null, null_jobs
    from moeharden.audit.ladder import strongest_keepset
    from moeharden.audit.ladder_records import HeadStartNull
    from moeharden.console import progress_bar

    lad = data.ladder
    keeps = dict(lad.settings["keeps"])
    attacked = [t for t in tasks if t.name in keeps]
    keepsets = {t.name: strongest_keepset(data, t.name, keeps[t.name]) for t in attacked}
    measured = {(name, attack): a.expert_head_start.area for name, s in lad.summary.items()
                for attack, a in s.attacks.items() if a.expert_head_start is not None}
    total = len(null_jobs([t.name for t in attacked], plan, settings.null_seeds))
    with progress_bar("null: shared curves at the limit", total=total) as bar:
        section = head_start_null(model, tokenizer, attacked, keepsets, plan, settings.null_seeds, gate=gate,
                                  full={t.name: t.full for t in data.tasks},
                                  target_fraction=float(lad.settings["target_fraction"]), measured=measured,
                                  checkpoint=checkpoint, trust_remote_code=settings.trust_remote_code,
                                  progress=bar, journal_dir=journal_dir)
    return HeadStartNull.model_validate(section)


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
    # lexists: a dangling link where the manifest should be is a tampered release, not an unlocked one;
    # a release that carries a signature is a locked one whether or not its manifest is still there
    if os.path.lexists(man) or (settings.manifest is None and os.path.lexists(path / "model.sig")):
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


def verify_attacks(ckpt: str, baseline: Path, out: Path, *, settings: VerifySettings | None = None,
                   keep_journal: bool = False) -> VerifyResult:
    """Re-attack ``ckpt``, compare with ``baseline`` (scan.json), write ``out/verify.json`` + report.

    The ladder's finished curves are journaled beside ``out`` as in :func:`moeharden.audit.scan.scan`
    (an interrupted verify run again resumes).

    Args:
        ckpt: the hardened checkpoint (local directory or Hub id).
        baseline: the baseline ``scan.json``.
        out: output directory (written atomically).
        settings: gate file, public key, manifest, modes, steps (``baseline``/``out`` fields are ignored).
        keep_journal: leave the journal after writing ``out`` (the demo removes it at its end).
    Returns:
        the result; ``passed`` is False when a gate row does not hold (the outputs are written either way).
    Raises:
        InputError (an invalid baseline), CheckpointError, ConfigFileError, IntegrityError, UsageError.
    """
    from moeharden.audit.gate import gate_rows, load_gate
    from moeharden.audit.report import render_verify
    from moeharden.audit.scan import ScanSettings, ladder_journal, model_identity, scan_model
    from moeharden.io.journal import remove_journal
    from moeharden.io.outputs import atomic_output_dir, check_output_dir
    from moeharden.io.ranks import current
    from moeharden.model.checkpoint import load_model, load_tokenizer, resolve_checkpoint
    from moeharden.model.registry import moe_layers
    from moeharden.model.validate import validate_checkpoint

    settings = settings or VerifySettings()
    base = load_document(baseline, ScanDocument)
    _check_null_seeds(settings.null_seeds, base)
    inputs = _inputs(ckpt, baseline, settings)
    check_output_dir(out, kind="verify", inputs=inputs)          # fail now, not after minutes of work
    journal = ladder_journal(out)
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
    tasks = baseline_tasks(path, base, settings.tasks)
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
                                          trust_remote_code=settings.trust_remote_code, journal_dir=journal)
    rows = gate_rows(gate, base, data, integrity=integrity)
    null = None
    if settings.null_seeds and data.ladder is not None:
        null = _head_start_null(model, tokenizer, tasks, data, plan, settings, gate, checkpoint=path,
                                journal_dir=journal)
    doc = VerifyDocument(**stamp(), checkpoint=identity, baseline=BaselineRef(path=str(baseline), model=base.model),
                         gate_settings=gate, gate=rows, passed=all(r.passed for r in rows), integrity=integrity,
                         attack=data, seconds=round(time.perf_counter() - t0, 2), head_start_null=null)
    if not current().main:      # under `accelerate launch` the first process writes the (same) document
        return VerifyResult(doc, None)
    with atomic_output_dir(out, kind="verify", inputs=inputs) as tmp:
        (tmp / "verify.json").write_text(json.dumps(doc.to_json(), indent=2) + "\n")
        render_verify(base, doc, tmp)
    if journal is not None and not keep_journal:
        remove_journal(journal)          # the output it served is in place
    return VerifyResult(doc, Path(out))


def _inputs(ckpt: str, baseline: Path, settings: VerifySettings) -> list:
    """What a verify reads, which its ``--out`` must not be or hold."""
    return [p for p in (ckpt, baseline, settings.gate, settings.pubkey, settings.manifest) if p is not None]


def _own_tasks(path: Path, base: ScanDocument) -> bool:
    """True when the baseline's tasks are the checkpoint's own task file (e.g. the demo model)."""
    f = path / "moeharden-tasks.yaml"
    if not f.exists():
        return False
    from moeharden.tasks.spec import read_task_file

    names = {t.name for t in read_task_file(f).tasks}
    return {t.name for t in base.tasks} <= names


def _recorded_specs(base: ScanDocument) -> list[str]:
    """The ``--task`` values of the baseline's tasks when none of them reads a file the user did
    not name again (presets and lm-eval names; old baselines: the task names).

    Raises:
        TaskError: a baseline task came from a task file or a local data file; the message gives
            the ``--task`` values to pass (a path recorded in scan.json is never opened on its own).
    """
    from moeharden.errors import TaskError
    from moeharden.tasks.resolve import LM_EVAL_PREFIX, preset_names

    presets = set(preset_names())
    options = [t.option or t.name for t in base.tasks]
    files = [o for o in options if not (o in presets or o.startswith(LM_EVAL_PREFIX))]
    if files:
        shown = " ".join(f"--task {shlex.quote(o)}" for o in files)
        raise TaskError("The baseline was scanned on tasks from files that this checkpoint does not carry; "
                        "verify reads a task file only when it is named on the command line.",
                        hint=f"Pass the same tasks again: {shown}")
    return options


def baseline_tasks(path: Path, base: ScanDocument, specs: tuple[str, ...] = ()) -> list:
    """The baseline's tasks, loaded for the checkpoint at ``path`` with the baseline's split caps.

    From ``specs`` (``--task``) when given, else the checkpoint's own ``moeharden-tasks.yaml`` when
    it holds every baseline task, else the baseline's recorded presets or lm-eval names. Each task's
    examples must be the ones the baseline scanned (``examples_sha256``): the gate compares like
    with like.

    Raises:
        TaskError: a baseline task is missing or differs from the baseline's, or comes from a
            file that ``specs`` does not name.
    """
    from moeharden.audit.scan import limit_tasks
    from moeharden.errors import TaskError
    from moeharden.tasks.resolve import load_tasks

    st = base.settings
    if specs:
        chosen: list[str] | None = list(specs)
    elif _own_tasks(path, base):
        chosen = None
    else:
        chosen = _recorded_specs(base)
    loaded = {t.name: t for t in limit_tasks(load_tasks(chosen, checkpoint_dir=path, limit=None, seed=None),
                                              st.limit, st.train_limit)}
    missing = [t.name for t in base.tasks if t.name not in loaded]
    if missing:
        raise TaskError(f"The baseline's task(s) {', '.join(missing)} are not among the tasks loaded for verify.",
                        hint="Pass the tasks the baseline was scanned on with --task.")
    changed = [t.name for t in base.tasks
               if t.examples_sha256 and loaded[t.name].examples_sha256() != t.examples_sha256]
    if changed:
        raise TaskError(f"Task(s) {', '.join(changed)} differ from the ones the baseline scanned (other data, "
                        "split or size): the gate would compare different tasks.",
                        hint="Verify with the task files and data the baseline scan used.")
    return [loaded[t.name] for t in base.tasks]
