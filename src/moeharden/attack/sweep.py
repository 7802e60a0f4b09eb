"""The pruning sweep: evaluate one loaded model under many expert masks.

For every task, method and keep-count K, the model is masked (never copied) to the K experts the
method ranks highest in every MoE layer and evaluated on the task's evaluation split. A
random-keep control is the mean over several seeded random keep-sets. Identical keep-sets (common
between methods) are evaluated once.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch

from moeharden.attack.attribution import keep_sets


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
    if metric == "perplexity":
        return float(full / pruned) if pruned > 0 else 0.0
    if full == 0:
        return 0.0
    return float(pruned / full)


def above_chance_retained(pruned: float, full: float, chance: float | None) -> float | None:
    """(pruned − chance) ÷ (full − chance): the share of above-chance performance a pruned model keeps."""
    if chance is None or full == chance:
        return None
    return float((pruned - chance) / (full - chance))


def random_keep_sets(layers: Sequence[int], num_experts: int, keep: int, seed: int,
                     groups: int = 1) -> dict[int, list[int]]:
    """A seeded random keep-set: ``keep`` experts per layer, independently per layer (and per
    routing group, ``keep / groups`` from each, when routing is group-limited)."""
    rng = random.Random(seed * 1_000_003 + keep)
    size, per = num_experts // groups, keep // groups
    return {layer: sorted(e for g in range(groups) for e in rng.sample(range(g * size, (g + 1) * size), per))
            for layer in layers}


@dataclass(frozen=True)
class SweepRow:
    """One evaluated (task, method, keep) cell; ``metric`` is a mean over seeds for ``random``."""

    task: str
    method: str
    keep: int
    metric: float
    retained: float
    above_chance: float | None
    seeds: tuple[int, ...] = ()
    std: float | None = None

    def to_dict(self) -> dict:
        d = {"task": self.task, "method": self.method, "keep": self.keep, "metric": round(self.metric, 6),
             "retained": round(self.retained, 6),
             "above_chance": None if self.above_chance is None else round(self.above_chance, 6)}
        if self.seeds:
            d["seeds"] = list(self.seeds)
            d["std"] = None if self.std is None else round(self.std, 6)
        return d


def run_sweep(
    *, task: str, metric: str, full: float, chance: float | None, layers: Sequence[int], num_experts: int,
    scores: Mapping[str, torch.Tensor], keeps: Sequence[int], evaluate_masked: Callable[[dict | None], float],
    ranking: str = "per_layer", random_seeds: Sequence[int] = (0, 1, 2), groups: int = 1,
    progress: Callable[[], None] | None = None,
) -> tuple[list[SweepRow], dict[str, dict[int, dict[int, list[int]]]]]:
    """Evaluate every method's keep-set at every K, plus the random control.

    Args:
        evaluate_masked: metric of the model with a keep-set applied (``None`` = full model).
        scores: ``{method: [L, E] score matrix}`` for this task.
    Returns:
        the rows, and the keep-sets used ``{method: {K: {layer: ids}}}`` (for reports and ``prune``).
    """
    cache: dict[tuple, float] = {}

    def cached(keep: dict[int, list[int]]) -> float:
        key = tuple(sorted((layer, tuple(ids)) for layer, ids in keep.items()))
        if key not in cache:
            cache[key] = float(evaluate_masked(keep))
        if progress is not None:
            progress()
        return cache[key]

    rows: list[SweepRow] = []
    used: dict[str, dict[int, dict[int, list[int]]]] = {}
    for k in keeps:
        if k >= num_experts:  # nothing pruned: the full model, reported once per method for the curves
            for m in [*scores, "random"]:
                rows.append(SweepRow(task, m, k, full, retained_fraction(metric, full, full),
                                     above_chance_retained(full, full, chance)))
            continue
        for m, s in scores.items():
            ks = keep_sets(s, layers, k, ranking=ranking, groups=groups)
            used.setdefault(m, {})[k] = ks
            v = cached(ks)
            rows.append(SweepRow(task, m, k, v, retained_fraction(metric, v, full),
                                 above_chance_retained(v, full, chance)))
        vals = [cached(random_keep_sets(layers, num_experts, k, seed, groups)) for seed in random_seeds]
        mean = sum(vals) / len(vals)
        std = (sum((x - mean) ** 2 for x in vals) / max(len(vals) - 1, 1)) ** 0.5
        rows.append(SweepRow(task, "random", k, mean, retained_fraction(metric, mean, full),
                             above_chance_retained(mean, full, chance), tuple(random_seeds), std))
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
