"""Which examples the re-alignment attacker labels next: random, entropy, margin or k-center.

``entropy``: highest predictive entropy over the choices; ``margin``: smallest gap between the two
most likely choices; ``kcenter``: greedy core-set on mean-pooled last hidden states. Uncertainty
comes from :class:`moeharden.attack.realign.taskops.TaskOps` (over the choices for multiple
choice, over the model's own greedy answer tokens for generation).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

import torch

STRATEGIES = ("random", "entropy", "margin", "kcenter")


def entropy_scores(logprobs: torch.Tensor) -> torch.Tensor:
    """Predictive entropy over choices, ``[N]`` (renormalised over the choices)."""
    lp = torch.log_softmax(logprobs.float(), dim=-1)
    return -(lp.exp() * lp).sum(-1)


def margin_scores(logprobs: torch.Tensor) -> torch.Tensor:
    """Negative gap between the two most likely choices, ``[N]`` (higher = more uncertain)."""
    p = torch.softmax(logprobs.float(), dim=-1)
    top2 = p.topk(min(2, p.shape[-1]), dim=-1).values
    gap = top2[:, 0] - (top2[:, 1] if top2.shape[1] > 1 else 0)
    return -gap


def kcenter_greedy(emb: torch.Tensor, labeled: Sequence[int], n: int, rng: random.Random) -> list[int]:
    """Greedy core-set: repeatedly take the pool point farthest from everything chosen so far.

    Args:
        emb: ``[N, H]`` pool embeddings; labeled: indices already chosen; n: how many to add.
    """
    N = emb.shape[0]
    if not labeled:
        first = rng.randrange(N)
        chosen, n = [first], n - 1
    else:
        chosen = []
    centers = list(labeled) + chosen
    d = torch.cdist(emb.float(), emb[centers].float()).min(1).values  # [N] distance to nearest center
    for _ in range(max(n, 0)):
        d[centers] = -1.0
        nxt = int(d.argmax())
        chosen.append(nxt)
        centers.append(nxt)
        d = torch.minimum(d, torch.cdist(emb.float(), emb[nxt:nxt + 1].float()).squeeze(1))
    return chosen


def select(strategy: str, model, ops: Any, pool: Sequence, labeled: list[int], n: int,
           rng: random.Random, candidates: int | None = 96) -> list[int]:
    """Pick ``n`` new pool indices to label (never one already labeled).

    Uncertainty strategies score a seeded random subset of ``candidates`` unlabeled examples
    (at least 4n); ``None`` scores the whole pool. A task without an uncertainty score
    (perplexity) falls back to ``random``.

    Args:
        strategy: one of :data:`STRATEGIES`.
        model: the model whose uncertainty (or embeddings) rank the pool.
        ops: the task's operations; pool: the unlabeled examples; labeled: indices already chosen.
        n: how many to add; rng: the run's seeded generator (selection is reproducible).
    Returns:
        up to ``n`` new pool indices.
    """
    free = [i for i in range(len(pool)) if i not in set(labeled)]
    n = min(n, len(free))
    if n <= 0:
        return []
    if strategy == "random" or (strategy in ("entropy", "margin") and not ops.has_uncertainty):
        return rng.sample(free, n)
    model.eval()
    with torch.no_grad():
        if strategy == "kcenter":
            # core-set over the labeled points and a seeded candidate subset of the pool
            cand = free if candidates is None or len(free) <= 2 * candidates else sorted(rng.sample(free, 2 * candidates))
            idx = list(labeled) + cand
            emb = ops.embed(model, [pool[i] for i in idx])
            picked = kcenter_greedy(emb, list(range(len(labeled))), n, rng)
            return [idx[j] for j in picked]
        # score a seeded candidate subset (≥ 4× what is needed), as pool-based active learning
        # usually does on large pools: keeps selection cheap next to training
        if candidates is not None and len(free) > max(candidates, 4 * n):
            free = sorted(rng.sample(free, max(candidates, 4 * n)))
        ent, mar = ops.uncertainty(model, [pool[i] for i in free])
    s = ent if strategy == "entropy" else mar
    order = sorted(range(len(free)), key=lambda j: (-float(s[j]), free[j]))
    return [free[j] for j in order[:n]]
