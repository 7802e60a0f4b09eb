"""The re-alignment attack over a scan: the strongest pruned models, every strategy, several seeds.

Builds the ``recovery``, ``labels_to_recover``, ``recovery_saving``, ``recovery_settings`` and
``recovery_timing`` sections of scan.json and verify.json. The defaults of those sections live
here once (:data:`DEFAULT_SMALL_BUDGET`, :data:`DEFAULT_TARGET_FRACTION`, :class:`SuiteSettings`);
readers of the documents import them rather than re-typing them.
"""

from __future__ import annotations

from dataclasses import dataclass

from moeharden.attack.realign.run import RecoverySettings, labels_to_recover, run_recovery
from moeharden.attack.realign.selection import STRATEGIES
from moeharden.attack.realign.taskops import task_ops
from moeharden.tasks.examples import higher_is_better

DEFAULT_SMALL_BUDGET = 64          # labels the attacker may buy per curve
DEFAULT_TARGET_FRACTION = 0.95     # "recovered" = this fraction of the full model's metric


@dataclass(frozen=True)
class SuiteSettings:
    """Knobs of the attack over a scan.

    Attributes:
        modes: recovery modes run (the first one, and ``distill``, count for labels-to-recover).
        strategies: selection strategies (``distill`` always runs ``random`` only).
        seeds: seeds per (task, keep, mode, strategy); a strategy's labels-to-recover is their mean.
        budget, rounds, steps_per_round, lr: of each run (:class:`RecoverySettings`).
        target_fraction: fraction of the full model's metric that counts as recovered (for
            perplexity: the full perplexity divided by it).
        keeps: keep-counts per task (``None`` or a missing task: :func:`recovery_keeps`).
    """

    modes: tuple[str, ...] = ("full",)
    strategies: tuple[str, ...] = STRATEGIES
    seeds: tuple[int, ...] = (0, 1, 2)
    budget: int = DEFAULT_SMALL_BUDGET
    rounds: int = 4
    steps_per_round: int = 30
    lr: float = 3e-4
    target_fraction: float = DEFAULT_TARGET_FRACTION
    keeps: dict[str, list[int]] | None = None


def recovery_keeps(data: dict, task: str, target_fraction: float, max_keeps: int = 1) -> list[int]:
    """Keep-counts ≤ E/2 at which the best attacker lost accuracy (retained < target), largest first.

    Falls back to the smallest swept keep-count when pruning lost nothing, so curves always exist.

    Args:
        data: the scan document (its ``model.num_experts`` and ``sweep`` rows).
        task: task name; target_fraction: retained fraction below which accuracy counts as lost.
        max_keeps: at most this many keep-counts.
    """
    E = data["model"]["num_experts"]
    rows = [r for r in data["sweep"] if r["task"] == task and r["method"] != "random" and r["keep"] < E]
    best: dict[int, float] = {}
    for r in rows:
        best[r["keep"]] = max(best.get(r["keep"], float("-inf")), r["retained"])
    lost = sorted((k for k, v in best.items() if v < target_fraction and k <= E // 2), reverse=True)
    if lost:
        return lost[:max_keeps]
    return [min(best)] if best else []


def best_keepset(data: dict, task: str, keep: int) -> tuple[str, dict[int, list[int]]]:
    """The strongest attacker's keep-set at ``keep`` (highest retained), from a scan's keep_sets.

    Returns:
        ``(method, {decoder layer: kept expert ids})``.
    """
    rows = [r for r in data["sweep"] if r["task"] == task and r["keep"] == keep and r["method"] != "random"]
    method = max(rows, key=lambda r: r["retained"])["method"]
    ks = data["keep_sets"][method][task][str(keep)]
    return method, {int(layer): ids for layer, ids in ks.items()}


def _plan(tasks, data: dict, s: SuiteSettings) -> tuple[list[tuple], dict[str, list[int]]]:
    """Every run as ``(task, keep, mode, strategy, seed)``, and the keep-counts used per task."""
    used_keeps, plan = {}, []
    for t in tasks:
        ks = (s.keeps or {}).get(t.name) or recovery_keeps(data, t.name, s.target_fraction)
        used_keeps[t.name] = ks
        for k in ks:
            for mode in s.modes:
                for strat in (s.strategies if mode != "distill" else ("random",)):
                    for seed in s.seeds:
                        plan.append((t, k, mode, strat, seed))
    return plan, used_keeps


def _curve_rows(task: str, keep: int, mode: str, name: str, seed: int, points) -> list[dict]:
    rows = []
    for labels, metric in points:
        row = {"task": task, "keep": keep, "mode": mode, "strategy": name, "seed": seed,
               "labels": 0 if mode == "distill" else labels, "metric": round(metric, 6)}
        if mode == "distill":
            row["unlabeled"] = labels
        rows.append(row)
    return rows


def _labels_needed(points, mode: str, full: float, metric: str, target_fraction: float) -> int | None:
    """Labels at which a curve first reaches ``target_fraction`` of the full model (perplexity: lower)."""
    hib = higher_is_better(metric)
    target = target_fraction * full if hib else full / target_fraction
    pts = [(lab if mode != "distill" else 0, m if hib else -m) for lab, m in points]
    return labels_to_recover(pts, target if hib else -target)


def _summaries(per_task: dict[str, dict[str, list]]) -> tuple[dict, dict]:
    """Mean labels-to-recover per strategy (``None`` unless every seed recovered), and the saving
    of the best active strategy over random labels."""
    ltr, saving = {}, {}
    for task, by_strat in per_task.items():
        ltr[task] = {s: (round(sum(v) / len(v), 2) if v and all(x is not None for x in v) else None)
                     for s, v in by_strat.items()}
        rnd = ltr[task].get("random")
        active = {s: v for s, v in ltr[task].items() if s not in ("random", "distill") and v is not None}
        if active:
            best = min(active, key=active.get)
            saving[task] = {"best_active": best, "labels": active[best], "random": rnd,
                            "saving_vs_random": None if not rnd else round(1 - active[best] / rnd, 4)}
    return ltr, saving


def recovery_suite(model, tokenizer, tasks, data: dict, settings: SuiteSettings | None = None) -> dict:
    """Run the re-alignment attack on the strongest pruned models of a scan; returns JSON sections.

    Args:
        model: the loaded full model (masked per run, restored after each).
        tokenizer: its tokenizer; tasks: the loaded tasks of the scan.
        data: the scan document (``tasks``, ``sweep``, ``keep_sets``, ``model``).
        settings: :class:`SuiteSettings` (``None``: the defaults).
    Returns:
        ``{"recovery": rows, "labels_to_recover": {task: {strategy: mean labels or None}},
        "recovery_settings": {...}, "recovery_saving": {task: {...}}, "recovery_timing": {...}}``;
        a strategy's entry is ``None`` unless every seed reached the target within the budget.
    """
    from moeharden.console import progress_bar
    from moeharden.io.ranks import spread
    from moeharden.model.masking import mask_experts
    from moeharden.model.registry import lora_targets, moe_layers

    s = settings or SuiteSettings()
    info = moe_layers(model)
    router_params = [li.router_weight for li in info] + [li.router_bias for li in info if li.router_bias is not None]
    targets = lora_targets(info)
    full = {t["name"]: t["full"] for t in data["tasks"]}
    metric_of = {t["name"]: t["metric"] for t in data["tasks"]}
    rows, timing = [], {"select": 0.0, "train": 0.0}
    plan, used_keeps = _plan(tasks, data, s)

    def one(job) -> tuple[list[dict], int | None, float, float]:
        t, k, mode, strat, seed = job
        _, keep = best_keepset(data, t.name, k)
        rs = RecoverySettings(mode=mode, strategy=strat, budget=s.budget, rounds=s.rounds,
                              steps_per_round=s.steps_per_round, lr=s.lr, seed=seed)
        run = run_recovery(model, task_ops(tokenizer, t), t.train, rs, router_params=router_params,
                           mask=lambda keep=keep: mask_experts(model, keep), lora_targets=targets)
        name = "distill" if mode == "distill" else strat
        need = _labels_needed(run.points, mode, full[t.name], metric_of[t.name], s.target_fraction)
        return (_curve_rows(t.name, k, mode, name, seed, run.points), need, run.select_seconds,
                run.train_seconds)

    per_task: dict[str, dict[str, list]] = {}
    with progress_bar("re-alignment attack", total=len(plan)) as advance:
        # every run is independent (seeded by its own seed): under `accelerate launch` the processes share them
        results = spread(plan, one, progress=advance)
    for (t, k, mode, strat, _seed), (curve, need, sel_s, train_s) in zip(plan, results, strict=True):
        timing["select"] += sel_s
        timing["train"] += train_s
        rows += curve
        if k == used_keeps[t.name][0] and (mode == s.modes[0] or mode == "distill"):
            per_task.setdefault(t.name, {}).setdefault("distill" if mode == "distill" else strat, []).append(need)
    ltr, saving = _summaries(per_task)
    return {
        "recovery": rows, "labels_to_recover": ltr, "recovery_saving": saving,
        "recovery_settings": {"modes": list(s.modes), "strategies": list(s.strategies), "seeds": list(s.seeds),
                              "budget": s.budget, "rounds": s.rounds, "steps_per_round": s.steps_per_round,
                              "lr": s.lr, "target_fraction": s.target_fraction, "keeps": used_keeps,
                              "labels_axis": "labels used (distill: 0; its examples are in 'unlabeled')"},
        "recovery_timing": {k: round(v, 3) for k, v in timing.items()},
    }


def recovery_for_scan(model, tokenizer, tasks, data: dict, settings) -> dict:
    """`scan --recover`: the attack with mode ``full`` and every strategy, ≥ 3 seeds.

    Args:
        settings: the scan's settings (``seed``, ``recover_seeds``, ``recover_budget``).
    """
    return recovery_suite(model, tokenizer, tasks, data, SuiteSettings(
        modes=("full",), seeds=tuple(range(settings.seed, settings.seed + settings.recover_seeds)),
        budget=settings.recover_budget or DEFAULT_SMALL_BUDGET))
