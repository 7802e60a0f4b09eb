"""The gate's expert-head-start rows at the physical limit (``verify --null-seeds N``).

A weight-level defense has done all it can when the pruned copy is no better a starting point than
the release's shared weights with fresh experts (docs/attacks-and-defenses.md §5.1, §5.5). The
``expert_head_start`` row compares the *strongest* pruned curve (fewest labels, largest area over
strategies and seeds) with the *typical* ``shared`` curve (median labels, mean area), so even such
a release fails it whenever its best seed beats the shared seeds' average by more than the
threshold. :func:`head_start_null` measures how often, on the release being verified: it runs
``seeds`` extra ``shared`` curves per task and attack (the verify's plan, pruned shape and
keep-set; seeds from :data:`NULL_SEED_BASE`, disjoint from the plan's), and forms *null trials*:
every split of them into a group that plays ``pruned`` (the plan's strategies and seed count, as
the attacker gets) and a disjoint group that plays ``shared`` (the plan's seeds, the first
strategy). Each trial's row is computed by the gate's own code
(:func:`moeharden.attack.realign.headstart.summarize`, :func:`moeharden.audit.gate.head_start_holds`)
and thresholds. The fail rate is the mean over trials: an estimate of the chance that the row
fails a defense at the limit (trials share curves, so it is not a binomial count).

Nothing in the gate changes: a row's pass or fail is the gate's. The section says, beside it,
whether the measured area lies beyond every null trial (a real head start) or within what a perfect
defense shows.
"""

from __future__ import annotations

import itertools
import statistics
import time
from collections.abc import Iterator, Sequence

from moeharden.attack.realign.ladder_suite import AttackPlan, CurveJob, run_curve_jobs

NULL_SEED_BASE = 1000      # the null's shared curves use seeds 1000, 1001, …: never one of the plan's


def null_jobs(task_names: Sequence[str], plan: AttackPlan, seeds: int) -> list[CurveJob]:
    """The ``shared`` curves the null needs: ``seeds`` per task for the label attack's first
    strategy and for distillation, and enough of every further label strategy for one group."""
    n = len(plan.seeds)
    extra = max(n, seeds - n)
    jobs = []
    for t in task_names:
        for s in range(seeds):
            jobs.append(CurveJob(t, "shared", "labels", plan.strategies[0], NULL_SEED_BASE + s))
            if plan.distill:
                jobs.append(CurveJob(t, "shared", "distill", "random", NULL_SEED_BASE + s))
        for st in plan.strategies[1:]:
            jobs += [CurveJob(t, "shared", "labels", st, NULL_SEED_BASE + s) for s in range(extra)]
    return jobs


def null_trials(curves: dict[tuple[str, int], dict], strategies: Sequence[str], n: int,
                attack: str) -> Iterator[tuple[list[dict], list[dict]]]:
    """Every split of ``curves`` (``{(strategy, seed): curve}``) into disjoint groups:
    ``(curves playing pruned, curves playing shared)``.

    The ``shared`` group takes ``n`` seeds of the first strategy; the ``pruned`` group ``n`` other
    seeds of the first strategy and, for the label attack, ``n`` seeds of each further strategy —
    the plan's shape — over every combination.
    """
    first = sorted(s for (st, s) in curves if st == strategies[0])
    others = [st for st in strategies[1:] if attack == "labels"]
    for ref in itertools.combinations(first, n):
        rest = [s for s in first if s not in ref]
        for pr in itertools.combinations(rest, n):
            choices = [itertools.combinations(sorted(s for (st2, s) in curves if st2 == st), n) for st in others]
            for extra in itertools.product(*choices) if others else [()]:
                pruned = [curves[(strategies[0], s)] for s in pr]
                for st, seeds in zip(others, extra, strict=True):
                    pruned += [curves[(st, s)] for s in seeds]
                yield pruned, [curves[(strategies[0], s)] for s in ref]


def null_rows(curves: Sequence[dict], *, plan: AttackPlan, gate, full: dict[str, float],
              higher: dict[str, bool], target_fraction: float,
              measured: dict[tuple[str, str], float]) -> list[dict]:
    """One row per (task, attack) of the null's ``shared`` curves (see the module doc).

    Args:
        measured: the verify's own ``expert_head_start`` area per ``(task, attack)``.
    """
    from moeharden.attack.realign.headstart import summarize
    from moeharden.audit.gate import head_start_holds

    n = len(plan.seeds)
    rows = []
    for task in dict.fromkeys(c["task"] for c in curves):
        for attack in ("labels", "distill"):
            strategies = tuple(plan.strategies) if attack == "labels" else ("random",)
            kind = {(c["strategy"], c["seed"]): c for c in curves if c["task"] == task and c["attack"] == attack}
            if not kind:
                continue
            fails, areas, ratios = 0, [], []
            for pruned, ref in null_trials(kind, strategies, n, attack):
                group = [dict(c, reference="pruned") for c in pruned] + [dict(c, reference="shared") for c in ref]
                hs = summarize(group, full={task: full[task]}, higher={task: higher[task]},
                               target_fraction=target_fraction)[task]["attacks"][attack]["expert_head_start"]
                ratio, holds = head_start_holds(gate, hs["pruned_labels"], hs["reference_labels"], hs["area"])
                fails += not holds
                areas.append(float(hs["area"]))
                if ratio is not None:
                    ratios.append(ratio)
            if not areas:
                continue
            got = measured.get((task, attack))
            rows.append({
                "task": task, "attack": attack, "trials": len(areas), "fail_rate": fails / len(areas),
                "area_median": statistics.median(areas), "area_max": max(areas),
                "ratio_median": statistics.median(ratios) if ratios else None,
                "ratio_below": sum(r < gate.expert_head_start_min_labels_ratio for r in ratios) / len(areas),
                "measured_area": got, "beyond_null": None if got is None else got > max(areas)})
    return rows


def head_start_null(model, tokenizer, tasks: Sequence, keepsets: dict[str, dict[int, list[int]]],
                    plan: AttackPlan, seeds: int, *, gate, full: dict[str, float], target_fraction: float,
                    measured: dict[tuple[str, str], float], checkpoint=None, trust_remote_code: bool = False,
                    progress=None, journal_dir=None) -> dict:
    """Run the null's ``shared`` curves and summarise them (the ``head_start_null`` section).

    ``journal_dir``: the ladder's journal (:func:`moeharden.audit.ladder.ladder_section`): the null's
    curves are journaled there too, under the same fingerprint (their seeds are not the plan's), so
    an interrupted verify run again reads back every finished curve of both.

    Returns:
        ``{"seeds", "rows", "all_pass_if_independent", "curves", "seconds"}``.
    """
    from moeharden.audit.ladder import curve_journal

    t0 = time.perf_counter()
    jobs = null_jobs([t.name for t in tasks], plan, seeds)
    with curve_journal(journal_dir, model, tokenizer, tasks, keepsets, plan) as journal:
        curves = run_curve_jobs(model, tokenizer, tasks, keepsets, plan, jobs, checkpoint=checkpoint,
                                trust_remote_code=trust_remote_code, progress=progress, journal=journal)
    rows = null_rows(curves, plan=plan, gate=gate, full=full, higher={t.name: t.higher_is_better for t in tasks},
                     target_fraction=target_fraction, measured=measured)
    together = 1.0
    for r in rows:
        together *= 1.0 - r["fail_rate"]
    return {"seeds": seeds, "rows": rows, "all_pass_if_independent": together, "curves": curves,
            "seconds": round(time.perf_counter() - t0, 2)}
