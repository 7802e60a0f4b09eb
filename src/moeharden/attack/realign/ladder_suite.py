"""The adaptive attack suite: every task × reference × attack × seed on the budget ladder.

For each task the suite runs :func:`moeharden.attack.realign.ladder.run_ladder` from three starting
points (:mod:`moeharden.attack.references`) — the stolen ``pruned`` copy, the ``shared`` weights
with fresh experts and router, and a ``scratch`` model — with the label attack (every selection
strategy of the plan on ``pruned``; ``random`` on the references) and the label-free distillation
attack (the released full model as teacher). Each curve is an independent job, so jobs can be
spread over worker processes (``workers``) and merged in plan order: the result does not depend on
how many processes ran it.

The validation split (the attacker's model-selection data) is carved from the task's ``train``
split with a fixed seed and is disjoint from the pool and from the evaluation split; its labels
are not counted in the ladder (generous to the attacker).
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from concurrent.futures import as_completed
from dataclasses import asdict, dataclass, field

from moeharden.attack.realign.ladder import LadderSettings, run_ladder
from moeharden.attack.references import REFERENCES
from moeharden.errors import UsageError

VALIDATION_SEED = 1234


@dataclass(frozen=True)
class AttackPlan:
    """What the adaptive suite runs (recorded in scan.json; verify repeats it).

    Attributes:
        references: starting points (``pruned`` always first).
        strategies: label-selection strategies tried on ``pruned`` (references use the first).
        distill: also run the label-free distillation attack.
        seeds: attacker seeds (each also seeds a reference's fresh initialisation).
        validation_size: rows of ``train`` held out for the attacker's choices.
        ladder: the grid and the rungs.
        workers: processes to spread the curves over (1: in this process).
    """

    references: tuple[str, ...] = REFERENCES
    strategies: tuple[str, ...] = ("random", "kcenter")
    distill: bool = True
    seeds: tuple[int, ...] = (0, 1, 2)
    validation_size: int = 64
    ladder: LadderSettings = field(default_factory=LadderSettings)
    workers: int = 1

    def __post_init__(self) -> None:
        from moeharden.attack.realign.selection import STRATEGIES

        if not self.references or self.references[0] != "pruned" or any(r not in REFERENCES for r in self.references):
            raise UsageError(f"The plan's references must start with pruned and come from {REFERENCES}.")
        if not self.strategies or any(s not in STRATEGIES for s in self.strategies):
            raise UsageError(f"Unknown strategy in {list(self.strategies)}.", hint=f"Choose from {', '.join(STRATEGIES)}.")
        if len(self.seeds) < 1 or self.validation_size < 1 or self.workers < 1:
            raise UsageError("The attack plan needs at least one seed, a validation split and one worker.")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class CurveJob:
    """One learning curve to run."""

    task: str
    reference: str
    attack: str
    strategy: str
    seed: int


def plan_jobs(task_names: Sequence[str], plan: AttackPlan, *, skip: set[tuple] = frozenset()) -> list[CurveJob]:
    """The plan's curves in a fixed order; ``skip`` holds ``(task, reference, attack)`` to leave out
    (e.g. the ``scratch`` curves a verify reuses from its baseline)."""
    jobs = []
    for t in task_names:
        for ref in plan.references:
            attacks = [("labels", s) for s in (plan.strategies if ref == "pruned" else plan.strategies[:1])]
            if plan.distill:
                attacks.append(("distill", "random"))
            for attack, strat in attacks:
                if (t, ref, attack) in skip:
                    continue
                for seed in plan.seeds:
                    jobs.append(CurveJob(t, ref, attack, strat, seed))
    return jobs


def attacker_splits(task, validation_size: int, pool_cap: int | None = None) -> tuple[list, list]:
    """``(validation, pool)`` from the task's ``train`` split: a fixed seeded draw, disjoint.

    The validation split takes ``validation_size`` rows (at most a quarter of ``train``); the pool
    is the rest, capped at ``pool_cap`` rows (the largest rung the plan can use), so a large
    training set costs no more than the ladder needs.
    """
    rows = list(task.train)
    random.Random(VALIDATION_SEED).shuffle(rows)
    n = min(validation_size, max(0, len(rows) // 4))
    pool = rows[n:]
    return rows[:n], pool if pool_cap is None else pool[:pool_cap]


def ladder_rungs(rungs: Sequence[int], pool_size: int) -> list[int]:
    """The rungs that fit the pool, plus the whole pool as the last rung when it is not already one."""
    out = [r for r in rungs if r <= pool_size]
    if pool_size > out[-1] and any(r > pool_size for r in rungs):
        out.append(pool_size)
    return out


class SuiteContext:
    """What every curve of one model needs: the model, its tasks, keep-sets and cached teachers."""

    def __init__(self, model, tokenizer, tasks, keepsets: dict[str, dict[int, list[int]]], plan: AttackPlan):
        from moeharden.attack.realign.taskops import task_ops

        self.model, self.tokenizer, self.plan = model, tokenizer, plan
        self.tasks = {t.name: t for t in tasks}
        self.keepsets = keepsets
        self.ops = {t.name: task_ops(tokenizer, t) for t in tasks}
        cap = max(max(plan.ladder.rungs), max(plan.ladder.prompt_rungs) if plan.distill else 0)
        self.splits = {t.name: attacker_splits(t, plan.validation_size, cap) for t in tasks}
        self._teacher: dict[str, list] = {}
        self._refs: dict[tuple[str, int], object] = {}

    def teacher(self, task: str) -> list:
        """The released full model's answers on the task's pool (computed once, unmasked)."""
        if task not in self._teacher:
            self._teacher[task] = self.ops[task].teacher(self.model, self.splits[task][1])
        return self._teacher[task]

    def start(self, reference: str, seed: int):
        """The starting model of a curve (references are built once per seed and cached)."""
        if reference == "pruned":
            return self.model
        key = (reference, seed)
        if key not in self._refs:
            from moeharden.attack.references import reference_model

            self._refs[key] = reference_model(self.model, reference, seed=seed)[0]
        return self._refs[key]


def run_job(ctx: SuiteContext, job: CurveJob) -> dict:
    """Run one curve; returns its JSON-ready record."""
    from moeharden.model.masking import mask_experts
    from moeharden.model.registry import moe_layers
    from moeharden.tasks.examples import best_possible
    from moeharden.tasks.intervals import metric_interval
    from moeharden.tasks.metrics import evaluate

    task, ops = ctx.tasks[job.task], ctx.ops[job.task]
    val, pool = ctx.splits[job.task]
    model = ctx.start(job.reference, job.seed)
    keep = ctx.keepsets[job.task]
    tok = ctx.tokenizer

    def score(m):
        return metric_interval(evaluate(m, tok, task))

    def val_score(m):
        return float(evaluate(m, tok, task, examples=val).value)

    def val_loss(m):
        import torch

        with torch.no_grad():
            return float(ops.loss(m, val))

    info = moe_layers(model)
    router_params = [li.router_weight for li in info] + [li.router_bias for li in info if li.router_bias is not None]
    s = ctx.plan.ladder
    rungs = ladder_rungs(s.rungs if job.attack == "labels" else s.prompt_rungs, len(pool))
    curve = run_ladder(model, ops, pool, s, attack=job.attack, mode="full", strategy=job.strategy, seed=job.seed,
                       score=score, val_score=val_score, higher_is_better=task.higher_is_better,
                       mask=lambda: mask_experts(model, keep), router_params=router_params,
                       teacher=ctx.teacher(job.task) if job.attack == "distill" else None, rungs=rungs,
                       best_possible=best_possible(task.metric), val_loss=val_loss,
                       meta={"task": job.task, "reference": job.reference,
                             "keep": len(next(iter(keep.values())))})
    return curve.to_dict()


# --------------------------------------------------------------------------- worker processes
_WORKER: SuiteContext | None = None


def _init_worker(checkpoint: str, tasks, keepsets, plan: AttackPlan, trust_remote_code: bool) -> None:
    """Worker-process initialiser: one thread, the model loaded once from the checkpoint on disk."""
    global _WORKER
    import torch

    from moeharden.model.checkpoint import load_model, load_tokenizer

    torch.set_num_threads(1)
    from pathlib import Path

    model = load_model(Path(checkpoint), trust_remote_code=trust_remote_code)
    tok = load_tokenizer(Path(checkpoint))
    _WORKER = SuiteContext(model, tok, tasks, keepsets, plan)


def _worker_job(job: CurveJob) -> dict:
    return run_job(_WORKER, job)


def run_suite(model, tokenizer, tasks, keepsets: dict[str, dict[int, list[int]]], plan: AttackPlan, *,
              checkpoint=None, skip: set[tuple] = frozenset(), trust_remote_code: bool = False,
              progress=None, journal=None) -> list[dict]:
    """Every curve of the plan, in plan order.

    Args:
        model, tokenizer: the loaded model under attack (used in this process).
        tasks: loaded tasks; keepsets: the pruned shape's keep-set per task.
        checkpoint: the model's directory on disk; with ``plan.workers > 1`` each worker process
            loads it once and runs a share of the curves (``spawn``; one thread per worker). Under
            ``accelerate launch`` the launch's processes share the curves instead (``workers`` unused).
        skip: ``(task, reference, attack)`` curves to leave out.
        progress: called after each finished curve.
        journal: finished curves of an interrupted run of the same inputs (:func:`run_curve_jobs`).
    Returns:
        curve records (:meth:`LadderCurve.to_dict`), the same whatever ``plan.workers`` is.
    """
    jobs = plan_jobs([t.name for t in tasks], plan, skip=set(skip))
    return run_curve_jobs(model, tokenizer, tasks, keepsets, plan, jobs, checkpoint=checkpoint,
                          trust_remote_code=trust_remote_code, progress=progress, journal=journal)


def run_curve_jobs(model, tokenizer, tasks, keepsets: dict[str, dict[int, list[int]]], plan: AttackPlan,
                   jobs: Sequence[CurveJob], *, checkpoint=None, trust_remote_code: bool = False,
                   progress=None, journal=None) -> list[dict]:
    """Run the given curves (any tasks, references, attacks, strategies and seeds of ``tasks``) as
    :func:`run_suite` runs the plan's: in this process, over ``plan.workers`` spawned processes, or
    over the processes of ``accelerate launch``; records in the order of ``jobs``.

    ``journal`` (a :class:`moeharden.io.journal.Journal` of these inputs): the curves it holds are
    read back, not run, and every curve run is added to it as soon as it ends, so an interrupted
    run loses only the curves in progress. A curve is a function of the model, tasks, keep-sets,
    plan and its job alone (the same in any process and order), so the records are the ones an
    uninterrupted run gives. Not used under ``accelerate launch`` (each process runs other curves).
    """
    from moeharden.io.ranks import current, spread

    lm_eval = any(getattr(t, "lm_eval", None) is not None for t in tasks)
    if current().size > 1:      # under `accelerate launch`: the launch's processes share the curves
        ctx = SuiteContext(model, tokenizer, tasks, keepsets, plan)
        return spread(jobs, lambda job: run_job(ctx, job), progress=progress)
    done = dict(journal.done) if journal is not None else {}
    todo = [j for j in jobs if job_key(j) not in done]
    ran: dict[str, dict] = {}

    def finished(job: CurveJob, record: dict) -> None:
        ran[job_key(job)] = record
        if journal is not None:
            journal.add(job_key(job), record)
        if progress is not None:
            progress()

    for _ in range(len(jobs) - len(todo)):      # read back from the journal
        if progress is not None:
            progress()
    if plan.workers <= 1 or checkpoint is None or len(todo) < 2 or lm_eval:
        ctx = SuiteContext(model, tokenizer, tasks, keepsets, plan)
        for job in todo:
            finished(job, run_job(ctx, job))
    else:
        from moeharden.io.pool import worker_pool

        # an interrupt or error stops the workers at once (a plain ProcessPoolExecutor ran every queued curve first)
        with worker_pool(plan.workers, _init_worker,
                         (str(checkpoint), list(tasks), keepsets, plan, trust_remote_code)) as ex:
            futures = {ex.submit(_worker_job, job): job for job in todo}
            for f in as_completed(futures):           # journaled as each ends, in whatever order
                finished(futures[f], f.result())
    return [done[k] if k in done else ran[k] for k in map(job_key, jobs)]


def job_key(job: CurveJob) -> str:
    """A curve's key in a run's journal (:class:`moeharden.io.journal.Journal`)."""
    return json.dumps([job.task, job.reference, job.attack, job.strategy, job.seed])


def plan_from_dict(d: dict, *, workers: int = 1) -> AttackPlan:
    """The :class:`AttackPlan` a report recorded (``settings`` of a ladder section), with ``workers``.

    Raises:
        UsageError: the recorded plan is not a valid plan.
    """
    try:
        lad = {k: tuple(v) if isinstance(v, list) else v for k, v in dict(d["ladder"]).items()}
        lad.setdefault("halving_every", 0)          # plans recorded before successive halving ran without it
        return AttackPlan(references=tuple(d["references"]), strategies=tuple(d["strategies"]),
                          distill=bool(d["distill"]), seeds=tuple(d["seeds"]),
                          validation_size=int(d["validation_size"]), ladder=LadderSettings(**lad), workers=workers)
    except (KeyError, TypeError, ValueError) as err:
        raise UsageError(f"The baseline's ladder plan is not valid ({type(err).__name__}: {err}).",
                         hint="Re-run the baseline scan with this version of moeharden.") from None
