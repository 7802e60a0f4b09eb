"""95% confidence intervals of task metrics: Wilson for proportions, a seeded percentile bootstrap
for everything else (perplexity, ROUGE, means of per-example scores).

Every metric moeharden reports carries ``(lo, hi)`` so that a gate can compare the conservative
end: a hardened model's *lower* bound against a utility threshold, an attack's *upper* bound
against a retained threshold. A point estimate on 128 examples moves by ±0.05 between seeds; the
interval says so.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence

Z95 = 1.959963984540054          # two-sided 95% normal quantile
BOOTSTRAP_SAMPLES = 1000
BOOTSTRAP_SEED = 20251201


def wilson(successes: float, n: int, *, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion.

    Args:
        successes: number of successes (``k``; may be fractional only when it came from k/n·n).
        n: trials (examples scored).
    Returns:
        ``(lo, hi)`` within [0, 1]; ``(0.0, 1.0)`` when ``n == 0`` (nothing was measured).
    """
    if n <= 0:
        return 0.0, 1.0
    p = min(max(successes / n, 0.0), 1.0)
    z2 = z * z
    denom = 1.0 + z2 / n
    centre = (p + z2 / (2 * n)) / denom
    half = z / denom * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


def bootstrap(items: Sequence, statistic: Callable[[Sequence], float], *, samples: int = BOOTSTRAP_SAMPLES,
              seed: int = BOOTSTRAP_SEED, level: float = 0.95) -> tuple[float, float]:
    """Seeded percentile bootstrap of ``statistic`` over resamples of ``items`` (with replacement).

    Returns:
        ``(lo, hi)``; ``(nan, nan)`` for an empty input.
    """
    n = len(items)
    if n == 0:
        return float("nan"), float("nan")
    rng = random.Random(seed)
    stats = sorted(statistic([items[rng.randrange(n)] for _ in range(n)]) for _ in range(samples))
    a = (1 - level) / 2
    lo_i = min(samples - 1, max(0, int(math.floor(a * samples))))
    hi_i = min(samples - 1, max(0, int(math.ceil((1 - a) * samples)) - 1))
    return float(stats[lo_i]), float(stats[hi_i])


def mean_interval(values: Sequence[float], **kw) -> tuple[float, float]:
    """Bootstrap interval of the mean of per-example scores (ROUGE, token F1, …)."""
    return bootstrap(list(values), lambda xs: sum(xs) / len(xs), **kw)


def perplexity_interval(docs: Sequence[tuple[float, int]], **kw) -> tuple[float, float]:
    """Bootstrap interval of corpus perplexity over documents.

    Args:
        docs: per document ``(summed negative log-likelihood in nats, tokens scored)``.
    """
    def ppl(xs):
        toks = sum(t for _, t in xs)
        return math.exp(sum(nll for nll, _ in xs) / toks) if toks else float("inf")
    return bootstrap(list(docs), ppl, **kw)


def retained_upper(pruned_hi: float, full_lo: float, chance: float | None) -> float | None:
    """Conservative (largest) above-chance retained fraction: the pruned model's upper bound over
    the full model's lower bound, both measured above chance. ``None`` when the full model's lower
    bound is not above chance (nothing can be concluded)."""
    if chance is None or full_lo - chance <= 1e-9:
        return None
    return (pruned_hi - chance) / (full_lo - chance)


# metrics that are a share of examples scored correct (moeharden's own names and lm-eval's)
PROPORTION_METRICS = frozenset({"accuracy", "exact_match", "acc", "acc_norm", "acc_mutual_info"})


def metric_interval(result) -> tuple[float, float, float]:
    """``(value, lo, hi)`` of an evaluation result (:class:`moeharden.tasks.metrics.EvalResult`).

    Uses the result's own interval when it carries one (``lo``/``hi``); else Wilson for a
    proportion metric scored on ``n`` examples; else ``(value, nan, nan)``.
    """
    value = float(result.value)
    lo, hi = getattr(result, "lo", None), getattr(result, "hi", None)
    if lo is not None and hi is not None:
        return value, float(lo), float(hi)
    if result.metric in PROPORTION_METRICS:
        lo, hi = wilson(round(value * result.n), result.n)
        return value, lo, hi
    return value, float("nan"), float("nan")
