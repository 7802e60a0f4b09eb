"""The pruning sweep: evaluate one loaded model under many expert masks.

For every task, method and keep-count K, the model is masked (never copied) to the K experts the
method ranks highest in every MoE layer and evaluated on the task's evaluation split. Ready
keep-sets of further methods (the attacker's searched keep-set,
:func:`moeharden.attack.keepsearch.search_keepsets`) are evaluated the same way. A random-keep
control is the mean over several seeded random keep-sets. Identical keep-sets (common between
methods) are evaluated once. When the evaluation gives a 95% interval, every row carries it and
the conservative retained fractions a gate compares.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch

from moeharden.attack.attribution import keep_sets
from moeharden.tasks.examples import higher_is_better
from moeharden.tasks.intervals import retained_upper


def default_keeps(num_experts: int, top_k: int) -> list[int]:
    """E, 3E/4, E/2, E/4, the model's top-k, and 1 (deduplicated, descending).

    K = 1 (below top-k, with top-k capped at K) is the most aggressive prune; it is where a
    strongly specialised model first loses accuracy, so the re-alignment attack has work to do.
    """
    ks = {num_experts, (3 * num_experts) // 4, num_experts // 2, num_experts // 4, top_k, 1}
    return sorted((k for k in ks if 1 <= k <= num_experts), reverse=True)


def retained_fraction(metric: str, pruned: float, full: float) -> float:
    """Pruned ÷ full for higher-is-better metrics; full ÷ pruned for perplexity (lower is better).

    For perplexity this equals 100 ÷ normalized perplexity (full model = 100, as in the paper).
    """
    if not higher_is_better(metric):
        return float(full / pruned) if pruned > 0 else 0.0
    if full == 0:
        return 0.0
    return float(pruned / full)


def above_chance_retained(pruned: float, full: float, chance: float | None) -> float | None:
    """(pruned − chance) ÷ (full − chance): the share of above-chance performance a pruned model keeps."""
    if chance is None or full == chance:
        return None
    return float((pruned - chance) / (full - chance))


def random_keep_set(rng: random.Random, layers: Sequence[int], num_experts: int, keep: int,
                    groups: int = 1) -> dict[int, list[int]]:
    """One random keep-set drawn from ``rng``: ``keep`` experts per layer, independently per layer,
    ``keep / groups`` from each routing group when routing is group-limited (so every group keeps
    the same number, as physical pruning needs)."""
    size, per = num_experts // groups, keep // groups
    return {layer: sorted(e for g in range(groups) for e in rng.sample(range(g * size, (g + 1) * size), per))
            for layer in layers}


def random_keep_sets(layers: Sequence[int], num_experts: int, keep: int, seed: int,
                     groups: int = 1) -> dict[int, list[int]]:
    """The random control's seeded keep-set for ``seed`` (see :func:`random_keep_set`)."""
    return random_keep_set(random.Random(seed * 1_000_003 + keep), layers, num_experts, keep, groups)


Interval = tuple[float | None, float | None]


def conservative_retained(metric: str, pruned: Interval, full: Interval,
                          chance: float | None) -> tuple[float | None, float | None]:
    """The largest retained and above-chance retained fractions the two intervals allow.

    The attacker's best end of the pruned interval over the full model's worst end: for a
    higher-is-better metric ``pruned_hi`` over ``full_lo``; for a lower-is-better one (perplexity)
    ``pruned_lo`` against ``full_hi``. This is the end a gate compares with a retained threshold.

    Args:
        pruned, full: ``(lo, hi)`` of the pruned and the full model's metric (``None`` = unknown).
        chance: the metric of a random guesser, or ``None``.
    Returns:
        ``(retained_hi, above_chance_hi)``; each ``None`` when an end it needs is unknown (and
        ``above_chance_hi`` also when the full model's worst end is not above chance).
    """
    (p_lo, p_hi), (f_lo, f_hi) = pruned, full
    if higher_is_better(metric):
        p_best, f_worst = p_hi, f_lo
    else:
        p_best, f_worst = p_lo, f_hi
    if p_best is None or f_worst is None:
        return None, None
    retained = retained_fraction(metric, p_best, f_worst)
    if chance is None:
        return retained, None
    if higher_is_better(metric):
        return retained, retained_upper(p_best, f_worst, chance)
    # mirror a lower-is-better metric so that "above chance" again means "larger"
    return retained, retained_upper(-p_best, -f_worst, -chance)


@dataclass(frozen=True)
class SweepRow:
    """One evaluated (task, method, keep) cell; ``metric`` is a mean over seeds for ``random``.

    ``pruned_lo``/``pruned_hi`` are the 95% interval of ``metric`` (for ``random``: the mean of
    the seeds' bounds) when the evaluation gave one; ``retained_hi`` and ``above_chance_hi`` are
    the conservative (largest) retained and above-chance retained fractions of
    :func:`conservative_retained`.
    """

    task: str
    method: str
    keep: int
    metric: float
    retained: float
    above_chance: float | None
    seeds: tuple[int, ...] = ()
    std: float | None = None
    pruned_lo: float | None = None
    pruned_hi: float | None = None
    retained_hi: float | None = None
    above_chance_hi: float | None = None

    def to_dict(self) -> dict:
        """Plain JSON; the interval keys appear only when the evaluation gave an interval."""
        d = {"task": self.task, "method": self.method, "keep": self.keep, "metric": round(self.metric, 6),
             "retained": round(self.retained, 6),
             "above_chance": None if self.above_chance is None else round(self.above_chance, 6)}
        if self.seeds:
            d["seeds"] = list(self.seeds)
            d["std"] = None if self.std is None else round(self.std, 6)
        if self.pruned_lo is not None or self.pruned_hi is not None:
            d.update({k: None if v is None else round(v, 6) for k, v in (
                ("pruned_lo", self.pruned_lo), ("pruned_hi", self.pruned_hi),
                ("retained_hi", self.retained_hi), ("above_chance_hi", self.above_chance_hi))})
        return d


Measured = float | tuple[float, float | None, float | None]


def _split(measured: Measured) -> tuple[float, float | None, float | None]:
    """``(value, lo, hi)`` of an ``evaluate_masked`` answer: a float, or a ``(value, lo, hi)`` tuple."""
    if isinstance(measured, tuple | list):
        value, lo, hi = measured
        return float(value), None if lo is None else float(lo), None if hi is None else float(hi)
    return float(measured), None, None


def run_sweep(
    *, task: str, metric: str, full: float, chance: float | None, layers: Sequence[int], num_experts: int,
    scores: Mapping[str, torch.Tensor], keeps: Sequence[int], evaluate_masked: Callable[[dict | None], Measured],
    ranking: str = "per_layer", random_seeds: Sequence[int] = (0, 1, 2), groups: int = 1,
    progress: Callable[[], None] | None = None, full_interval: tuple[float, float] | None = None,
    extra_keepsets: Mapping[str, Mapping[int, Mapping[int, Sequence[int]]]] | None = None,
) -> tuple[list[SweepRow], dict[str, dict[int, dict[int, list[int]]]]]:
    """Evaluate every method's keep-set at every K, plus the random control.

    Args:
        evaluate_masked: metric of the model with a keep-set applied (``None`` = full model):
            a float, or ``(value, lo, hi)`` with its 95% interval.
        scores: ``{method: [L, E] score matrix}`` for this task.
        full_interval: ``(lo, hi)`` of the full model's metric ``full`` (enables the rows'
            ``retained_hi``/``above_chance_hi``).
        extra_keepsets: ready keep-sets of further methods, ``{method: {K: {layer: ids}}}`` (e.g.
            ``search``, the attacker's searched keep-set); each is evaluated at the Ks it lists,
            exactly like an attribution method.
    Returns:
        the rows, and the keep-sets used ``{method: {K: {layer: ids}}}`` (for reports and ``prune``).
    """
    cache: dict[tuple, tuple[float, float | None, float | None]] = {}
    f_lo, f_hi = full_interval if full_interval is not None else (None, None)
    extra = {m: {int(k): {int(layer): sorted(int(e) for e in ids) for layer, ids in ks.items()}
                 for k, ks in per_k.items()} for m, per_k in (extra_keepsets or {}).items()}

    def cached(keep: dict[int, list[int]]) -> tuple[float, float | None, float | None]:
        key = tuple(sorted((layer, tuple(ids)) for layer, ids in keep.items()))
        if key not in cache:
            cache[key] = _split(evaluate_masked(keep))
        if progress is not None:
            progress()
        return cache[key]

    def row(m: str, k: int, v: float, lo: float | None, hi: float | None, **kw) -> SweepRow:
        r_hi, ac_hi = conservative_retained(metric, (lo, hi), (f_lo, f_hi), chance)
        return SweepRow(task, m, k, v, retained_fraction(metric, v, full), above_chance_retained(v, full, chance),
                        pruned_lo=lo, pruned_hi=hi, retained_hi=r_hi, above_chance_hi=ac_hi, **kw)

    rows: list[SweepRow] = []
    used: dict[str, dict[int, dict[int, list[int]]]] = {}
    for k in keeps:
        if k >= num_experts:  # nothing pruned: the full model, reported once per method for the curves
            for m in [*scores, *extra, "random"]:
                rows.append(row(m, k, full, f_lo, f_hi))
            continue
        for m, s in scores.items():
            ks = keep_sets(s, layers, k, ranking=ranking, groups=groups)
            used.setdefault(m, {})[k] = ks
            rows.append(row(m, k, *cached(ks)))
        for m, per_k in extra.items():
            if k in per_k:
                used.setdefault(m, {})[k] = per_k[k]
                rows.append(row(m, k, *cached(per_k[k])))
        vals = [cached(random_keep_sets(layers, num_experts, k, seed, groups)) for seed in random_seeds]
        mean = sum(v for v, _, _ in vals) / len(vals)
        std = (sum((v - mean) ** 2 for v, _, _ in vals) / max(len(vals) - 1, 1)) ** 0.5
        los, his = [lo for _, lo, _ in vals], [hi for _, _, hi in vals]
        lo = None if None in los else sum(los) / len(los)
        hi = None if None in his else sum(his) / len(his)
        rows.append(row("random", k, mean, lo, hi, seeds=tuple(random_seeds), std=std))
    return rows, used


def headline(rows: Sequence[SweepRow], num_experts: int) -> dict:
    """The best attacker (not the random control) at 25% and 50% of experts kept.

    Uses the largest swept K not above the target fraction; ``None`` when no such K was swept.
    """
    out = {}
    for label, frac in (("keep_25", 0.25), ("keep_50", 0.5)):
        cands = sorted({r.keep for r in rows if r.keep <= frac * num_experts and r.keep < num_experts})
        if not cands:
            out[label] = {"keep": None, "retained": None, "method": None}
            continue
        k = cands[-1]
        best = max((r for r in rows if r.keep == k and r.method != "random"), key=lambda r: r.retained,
                   default=None)
        out[label] = {"keep": k, "retained": None if best is None else round(best.retained, 6),
                      "method": None if best is None else best.method,
                      "above_chance": None if best is None or best.above_chance is None
                      else round(best.above_chance, 6)}
    return out
