"""Where entangled training draws its pruned sub-models S from: the attacker's likely keep-sets.

Three pools per task: (a) the keep-sets every attribution method of ``scan`` picks
(:func:`attribution_pool`), recomputed every ``recompute_every`` steps as routing moves;
(b) random subsets at the recipe's keep-ratios; (c) adversarially searched keep-sets
(:func:`adversarial_keepset`: a hill-climb over single-expert swaps minimising the pruned
model's task loss — the attacker's best choice on a batch). :func:`sample_keepset` draws one S.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from moeharden.attack.attribution import contrastive_scores, keep_sets, observed_scores, routing_stats
from moeharden.defend.entangle.recipe import EntangleRecipe
from moeharden.model.masking import mask_experts
from moeharden.tasks.encoding import answer_logits, encode

KeepSet = dict[int, list[int]]          # {decoder layer: kept expert ids}


def train_keeps(num_experts: int, ratios: Sequence[float], valid: Callable[[int], bool] | None = None) -> list[int]:
    """Keep-counts for training: round(r·E) for each ratio, within 1..E−1, deduplicated.

    With ``valid`` (whether the family's routing can run with a count: routing groups, minimums —
    :func:`moeharden.model.keepset.valid_keep`), each count becomes the smallest valid count at or
    above it below E (none: the ratio is dropped), the smallest sub-models an attacker can build.
    """
    counts = {min(max(round(r * num_experts), 1), num_experts - 1) for r in ratios}
    if valid is not None:
        counts = {next((c for c in range(k, num_experts) if valid(c)), 0) for k in counts} - {0}
    return sorted(counts)


@torch.no_grad()
def attribution_pool(model, tokenizer, tasks, layers: list[int], num_experts: int, keeps: Sequence[int],
                     methods: Sequence[str], batch_size: int = 32, groups: int = 1) -> dict[str, list[KeepSet]]:
    """The keep-sets every observation-based attribution method picks, per task and keep-count
    (with group-limited routing, the same count from every routing group, as ``scan`` picks them).

    Returns:
        ``{task name: distinct keep-sets}``, in method-then-keep order.
    """
    stats = {t.name: routing_stats(model, tokenizer, t.calibration_texts(), layers, num_experts, batch_size)
             for t in tasks}
    pool: dict[str, list[KeepSet]] = {}
    for t in tasks:
        scores = observed_scores(stats[t.name])
        scores["contrastive"] = contrastive_scores(stats[t.name], [stats[o.name] for o in tasks if o.name != t.name])
        sets = []
        for m in methods:
            for k in keeps:
                ks = keep_sets(scores[m], layers, k, groups=groups)
                if ks not in sets:
                    sets.append(ks)
        pool[t.name] = sets
    return pool


@torch.no_grad()
def adversarial_keepset(model, batch, start: KeepSet, num_experts: int, swaps: int,
                        rng: random.Random, groups: int = 1) -> KeepSet:
    """Hill-climb over single-expert swaps to the keep-set whose pruned model has the lowest task CE.

    This is the attacker's best response on this batch among the neighbours of ``start``. With
    group-limited routing (``groups`` > 1) an expert is swapped for one of its own routing group,
    so every neighbour keeps the same count per group (a keep-set the routing can run with).
    """
    def ce(keep):
        with mask_experts(model, keep):
            logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        al, at = answer_logits(logits, batch.labels)
        return float(F.cross_entropy(al.float(), at))

    best, best_ce = {k: list(v) for k, v in start.items()}, ce(start)
    layers = sorted(best)
    for _ in range(swaps):
        layer = rng.choice(layers)
        swapped = _swap_one(rng, best[layer], num_experts, groups)
        if swapped is None:
            continue
        cand = {**{k: list(v) for k, v in best.items()}, layer: swapped}
        c = ce(cand)
        if c < best_ce:
            best, best_ce = cand, c
    return best


def _swap_one(rng: random.Random, kept: list[int], num_experts: int, groups: int) -> list[int] | None:
    """``kept`` with one expert swapped for one it lacks (inside the dropped expert's routing group
    when ``groups`` > 1); None when this draw gives no such neighbour. Without groups the draws are
    those the hill-climb always made (a removal drawn per element, kept only when exactly one goes)."""
    if groups > 1:
        size = num_experts // groups
        drop = rng.choice(kept)
        out_ids = [e for e in range(drop // size * size, (drop // size + 1) * size) if e not in kept]
        return sorted([e for e in kept if e != drop] + [rng.choice(out_ids)]) if out_ids else None
    out_ids = [e for e in range(num_experts) if e not in kept]
    if not out_ids:
        return None
    swapped = sorted([e for e in kept if e != rng.choice(kept)] + [rng.choice(out_ids)])
    return swapped if len(swapped) == len(kept) else None


def refresh_pools(model, tokenizer, tasks, layers: list[int], num_experts: int, keeps: Sequence[int],
                  recipe: EntangleRecipe, rng: random.Random, device, groups: int = 1) -> tuple[dict, dict]:
    """Recompute the attribution pool and, from it, one adversarial keep-set per keep-count ≤ E/2.

    Returns:
        ``(attribution pool, adversarial pool)``, both ``{task name: [keep-set, ...]}``.
    """
    attr_pool = attribution_pool(model, tokenizer, tasks, layers, num_experts, keeps, recipe.attribution_methods,
                                 recipe.batch_size, groups)
    adv_pool = {}
    for t in tasks:
        ex = rng.sample(t.attribution, min(recipe.batch_size, len(t.attribution)))
        b = encode(tokenizer, ex).to(device)
        adv_pool[t.name] = [adversarial_keepset(model, b, rng.choice([s for s in attr_pool[t.name]
                                                                      if len(s[layers[0]]) == k]),
                                                num_experts, recipe.adversarial_swaps, rng, groups)
                            for k in keeps if k <= num_experts // 2]
    return attr_pool, adv_pool


def sample_keepset(rng: random.Random, recipe: EntangleRecipe, attr: list, adv: list, layers: list[int],
                   num_experts: int, keeps: Sequence[int], groups: int = 1) -> tuple[str, KeepSet]:
    """Draw one pruned sub-model S: attribution-picked, random, or adversarial (by recipe weights);
    a random one keeps the same count from every routing group (``groups`` > 1).

    Returns:
        ``(source name, keep-set)``; an empty pool's source is never drawn.
    """
    sources = [s for s, w in recipe.sources.items() if w > 0 and (s == "random" or (attr if s == "attribution" else adv))]
    weights = [recipe.sources[s] for s in sources]
    src = rng.choices(sources, weights=weights)[0]
    if src == "attribution":
        return src, rng.choice(attr)
    if src == "adversarial":
        return src, rng.choice(adv)
    k = rng.choice(list(keeps))
    if groups > 1:
        size = num_experts // groups
        return src, {layer: sorted(e for g in range(groups) for e in rng.sample(range(g * size, (g + 1) * size),
                                                                                k // groups))
                     for layer in layers}
    return src, {layer: sorted(rng.sample(range(num_experts), k)) for layer in layers}
