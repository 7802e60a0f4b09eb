"""The ``ladder`` section of scan.json and verify.json: the adaptive attack from three starting points.

:func:`ladder_section` runs :func:`moeharden.attack.realign.ladder_suite.run_suite` on a loaded
model with each task's strongest pruned keep-set, and summarises the curves
(:func:`moeharden.attack.realign.headstart.summarize`) against the attacked full model's metric.

A verify may reuse its baseline's ``scratch`` curves: a freshly initialised model of the pruned
architecture does not depend on the checkpoint's weights, so the curves are the same computation
when the architecture, the keep count, the tasks' splits and the plan are the same (checked
field by field; otherwise the curves are run again).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import asdict

from moeharden.attack.realign.ladder_suite import AttackPlan, job_key, plan_jobs, run_suite


def _fingerprint(plan: AttackPlan, identity: dict, task_sizes: dict[str, list[int]], keeps: dict[str, int]) -> dict:
    """What must match for a baseline's scratch curves to be this run's scratch curves (the
    architecture — parameter names, shapes, dtypes —, the expert count, the splits' sizes, the keep
    counts and the plan; not the weights, which a fresh model does not use)."""
    import json

    p = asdict(plan)
    p.pop("workers", None)
    fp = {"plan": p, "model_type": identity.get("model_type"), "num_experts": identity.get("num_experts"),
          "architecture_sha256": identity.get("architecture_sha256"), "task_sizes": task_sizes, "keeps": keeps}
    return json.loads(json.dumps(fp))        # as it reads back from a report (tuples become lists)


def journal_fingerprint(model, tokenizer, tasks: Sequence, keepsets: dict, plan: AttackPlan) -> str:
    """What every curve of a ladder depends on, as one sha256: the weights (every tensor's bytes),
    the tokenizer's vocabulary, each task's examples (:meth:`Task.examples_sha256`), the keep-sets,
    the plan (not ``workers``: the curves are the same in any process) and the versions of
    moeharden, torch and transformers. A journal is reused only under the same fingerprint."""
    from moeharden.model.checkpoint import run_inputs_sha256

    p = asdict(plan)
    p.pop("workers", None)
    return run_inputs_sha256(model, tokenizer, tasks, plan=p,
                             keepsets={t: {str(k): list(v) for k, v in ks.items()} for t, ks in keepsets.items()})


def valid_curve(key: str, record: dict) -> bool:
    """A journaled curve is read back only if it is a valid curve record of its own job."""
    import json

    from pydantic import ValidationError

    from moeharden.audit.ladder_records import LadderCurveRecord

    try:
        c = LadderCurveRecord.model_validate(record)
    except ValidationError:
        return False
    try:
        return json.loads(key) == [c.task, c.reference, c.attack, c.strategy, c.seed]
    except (ValueError, RecursionError):        # a key that is not one of ours: run the curve again
        return False


@contextmanager
def curve_journal(journal_dir, model, tokenizer, tasks: Sequence, keepsets: dict, plan: AttackPlan):
    """The run's :class:`~moeharden.io.journal.Journal` of finished curves under
    :func:`journal_fingerprint`, holding only valid curve records (:func:`valid_curve`); ``None``
    without ``journal_dir``."""
    from moeharden.io.journal import Journal

    if not journal_dir:
        yield None
        return
    with Journal(journal_dir, journal_fingerprint(model, tokenizer, tasks, keepsets, plan)) as journal:
        journal.done = {k: v for k, v in journal.done.items() if valid_curve(k, v)}
        yield journal


def ladder_section(model, tokenizer, tasks: Sequence, *, identity: dict, full: dict[str, float],
                   keepsets: dict[str, dict[int, list[int]]], plan: AttackPlan, target_fraction: float,
                   checkpoint=None, reuse: dict | None = None, trust_remote_code: bool = False,
                   progress=None, journal_dir=None) -> dict:
    """Run the plan's curves and return the JSON section.

    Args:
        identity: the model identity block of the document (model type, expert count, config hash).
        full: the attacked full model's metric per task (the target is a fraction of it).
        keepsets: per task, the strongest attacker's keep-set of the pruned shape.
        reuse: a baseline's ``ladder`` section whose ``scratch`` curves may be reused.
        journal_dir: keep each finished curve there (:class:`moeharden.io.journal.Journal`), and
            read back those an interrupted run of the same inputs finished; the caller removes it
            once its output is written (:func:`moeharden.io.journal.remove_journal`).
    Returns:
        ``{"settings", "fingerprint", "curves", "summary", "reused_scratch", "resumed_curves",
        "seconds"}``.
    """
    from rich.markup import escape

    from moeharden.attack.realign.headstart import summarize
    from moeharden.console import info

    t0 = time.perf_counter()
    sizes = {t.name: [len(t.evaluation), len(t.train)] for t in tasks}
    keeps = {name: len(next(iter(ks.values()))) for name, ks in keepsets.items()}
    fp = _fingerprint(plan, identity, sizes, keeps)
    reused: list[dict] = []
    skip: set[tuple] = set()
    if reuse and reuse.get("fingerprint") == fp:
        reused = [c for c in reuse.get("curves", []) if c["reference"] == "scratch"]
        skip = {(c["task"], "scratch", c["attack"]) for c in reused}
    with curve_journal(journal_dir, model, tokenizer, tasks, keepsets, plan) as journal:
        resumed = 0 if journal is None else sum(job_key(j) in journal.done for j in
                                                 plan_jobs([t.name for t in tasks], plan, skip=skip))
        if resumed:
            info(f"Resuming: {resumed} finished curve(s) read back from {escape(str(journal.directory))}.")
        ran = run_suite(model, tokenizer, tasks, keepsets, plan, checkpoint=checkpoint, skip=skip,
                        trust_remote_code=trust_remote_code, progress=progress, journal=journal)
    # plan order, with the reused curves where they would have run
    by_key = {(c["task"], c["reference"], c["attack"], c["strategy"], c["seed"]): c for c in ran + reused}
    curves = [by_key[(j.task, j.reference, j.attack, j.strategy, j.seed)]
              for j in plan_jobs([t.name for t in tasks], plan)]
    higher = {t.name: t.higher_is_better for t in tasks}
    return {
        "settings": {**asdict(plan), "keeps": keeps, "target_fraction": target_fraction},
        "fingerprint": fp,
        "curves": curves,
        "summary": summarize(curves, full=full, higher=higher, target_fraction=target_fraction),
        "reused_scratch": bool(reused),
        "resumed_curves": resumed,
        "seconds": round(time.perf_counter() - t0, 2),
    }


def planned_curves(task_names: Sequence[str], plan: AttackPlan) -> int:
    """How many curves the plan runs (for progress bars)."""
    return len(plan_jobs(task_names, plan))


LADDER_KEEP_FRACTION = 0.5    # the pruned shape attacked: the largest swept K ≤ half the experts


def ladder_keep(doc, task: str, fraction: float = LADDER_KEEP_FRACTION) -> int | None:
    """The largest swept keep-count K < E with K ≤ ``fraction``·E for ``task`` (the strongest gated theft)."""
    E = doc.model.num_experts
    ks = sorted({r.keep for r in doc.sweep if r.task == task and r.keep < E and r.keep <= fraction * E})
    return ks[-1] if ks else None


def strongest_keepset(doc, task: str, keep: int) -> dict[int, list[int]]:
    """The keep-set of the attacker that retained most at ``keep`` (attribution methods and ``search``)."""
    from moeharden.attack.realign.suite import best_keepset

    return best_keepset(doc.to_json(), task, keep)[1]


def ladder_for_document(model, tokenizer, tasks, doc, plan: AttackPlan, *, checkpoint=None,
                        keeps: dict[str, int] | None = None, reuse=None, trust_remote_code: bool = False,
                        journal_dir=None):
    """The typed ``ladder`` section for a scan document ``doc`` of ``model``.

    Args:
        keeps: the keep-count per task (a verify passes its baseline's, so both attack the same shape);
            default :func:`ladder_keep`.
        reuse: the baseline's :class:`LadderSection` (its ``scratch`` curves may be reused).
        journal_dir: the run's journal of finished curves (:func:`ladder_section`).
    Returns:
        a :class:`moeharden.audit.ladder_records.LadderSection`.
    """
    import hashlib

    from moeharden.attack.realign.suite import DEFAULT_TARGET_FRACTION
    from moeharden.audit.ladder_records import LadderSection
    from moeharden.console import progress_bar

    # the architecture, not config.json's bytes (lock writes its policy there): every parameter's
    # name, shape and dtype
    arch = hashlib.sha256("\n".join(f"{n}:{tuple(p.shape)}:{p.dtype}" for n, p in model.named_parameters())
                          .encode()).hexdigest()
    keepsets = {}
    for t in tasks:
        k = (keeps or {}).get(t.name) or ladder_keep(doc, t.name)
        if k is None or not t.train:
            continue
        keepsets[t.name] = strongest_keepset(doc, t.name, k)
    attacked = [t for t in tasks if t.name in keepsets]
    full = {t.name: t.full for t in doc.tasks}
    with progress_bar("adaptive re-alignment ladder", total=planned_curves([t.name for t in attacked], plan)) as adv:
        section = ladder_section(model, tokenizer, attacked, identity={**doc.model.to_json(), "architecture_sha256": arch},
                                 full=full,
                                 keepsets=keepsets, plan=plan, target_fraction=DEFAULT_TARGET_FRACTION,
                                 checkpoint=checkpoint, reuse=None if reuse is None else reuse.to_json(),
                                 trust_remote_code=trust_remote_code, progress=adv, journal_dir=journal_dir)
    return LadderSection.model_validate(section)
