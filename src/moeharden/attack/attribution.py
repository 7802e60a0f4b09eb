"""Expert attribution: which experts does a task use?

Every observation-based method is computed from one routing record over a task's calibration
(attribution-split) texts, in a single pass (:func:`observe`). Each method yields a
``[layers × experts]`` score matrix; higher means "the attacker keeps this expert".

=============  ==========================================================================
method         score of expert e in layer l
=============  ==========================================================================
frequency      number of calibration tokens routed to e (the paper's activation frequency)
gate           sum over routed tokens of e's combine weight g_e(x)
reap           mean over e's routed tokens of g_e(x) · ‖f_e(x)‖₂ (REAP, Cerebras 2025)
ean            sum over routed tokens of ‖f_e(x)‖₂ (expert activation norm)
soft           mean over all tokens of the routing probability p_e(x)
contrastive    routing rate on this task minus the rate on the other tasks (SteerMoE-style)
ablation       rise in task loss when e alone is masked in its layer (loss-based; extra passes)
=============  ==========================================================================

All matrices are plain nested lists in reports; in memory they are ``torch.Tensor [L, E]`` whose
rows follow the decoder-layer indices of :attr:`RoutingStats.layers`. Choosing a keep-set for one
checkpoint and task from these scores is :mod:`moeharden.attack.keepsearch`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

OBSERVED_METHODS = ("frequency", "gate", "reap", "ean", "soft")
ALL_METHODS = (*OBSERVED_METHODS, "contrastive", "ablation")
MAX_BATCH_TOKENS = 2048     # padded tokens per forward of the attribution pass: the floor of the automatic budget
AUTO_TOKENS_SHARE = 0.05    # the automatic budget keeps one forward's expert activations under this share of the weights
AUTO_TOKENS_CAP = 16384


@dataclass
class RoutingStats:
    """Per-layer sums gathered from a routing record; cheap to merge across batches.

    Shapes: every tensor is ``[L, E]`` (float64), rows ordered as :attr:`layers`.
    """

    layers: list[int]
    num_experts: int
    tokens: int = 0
    count: torch.Tensor | None = None      # tokens routed to e
    gate: torch.Tensor | None = None       # Σ g_e(x)
    weighted_norm: torch.Tensor | None = None  # Σ g_e(x)·‖f_e(x)‖
    norm: torch.Tensor | None = None       # Σ ‖f_e(x)‖
    prob: torch.Tensor | None = None       # Σ p_e(x) over all tokens

    def __post_init__(self) -> None:
        shape = (len(self.layers), self.num_experts)
        for name in ("count", "gate", "weighted_norm", "norm", "prob"):
            if getattr(self, name) is None:
                setattr(self, name, torch.zeros(shape, dtype=torch.float64))


def stats_from_record(record, layers: Sequence[int], num_experts: int) -> RoutingStats:
    """Reduce a :class:`moeharden.model.routing.RoutingRecord` to per-expert sums.

    Args:
        record: the routing record (``record.layers[l]`` has ``indices [T,k]``, ``weights [T,k]``,
            optional ``norms [T,k]`` and ``probs [T,E]``; padding already removed). Picks of null
            experts (ids ``≥ E``, LongCat-Flash) count for no expert.
        layers: decoder-layer indices of the MoE layers, in row order.
        num_experts: experts per layer (E).
    """
    st = RoutingStats(list(layers), num_experts)
    for row, layer in enumerate(layers):
        rec = record.layers[layer]
        idx = rec.indices.reshape(-1).long()                     # [T*k]
        w = rec.weights.reshape(-1).double()                     # [T*k]
        real = idx < num_experts                                 # picks of null experts are no expert's
        idx, w = idx[real], w[real]
        st.count[row] += torch.bincount(idx, minlength=num_experts).double()
        st.gate[row] += torch.bincount(idx, weights=w, minlength=num_experts)
        if rec.norms is not None:
            n = rec.norms.reshape(-1).double()[real]
            st.norm[row] += torch.bincount(idx, weights=n, minlength=num_experts)
            st.weighted_norm[row] += torch.bincount(idx, weights=w * n, minlength=num_experts)
        if rec.probs is not None:
            st.prob[row] += rec.probs.double().sum(0)
        if row == 0:
            st.tokens += int(rec.indices.shape[0])
    return st


def merge_stats(a: RoutingStats, b: RoutingStats) -> RoutingStats:
    """Sum two stats objects over the same layers."""
    return RoutingStats(a.layers, a.num_experts, a.tokens + b.tokens, a.count + b.count, a.gate + b.gate,
                        a.weighted_norm + b.weighted_norm, a.norm + b.norm, a.prob + b.prob)


def observed_scores(st: RoutingStats) -> dict[str, torch.Tensor]:
    """The observation-based score matrices ``{method: [L, E]}`` from one set of stats."""
    tokens = max(st.tokens, 1)
    return {
        "frequency": st.count.clone(),
        "gate": st.gate.clone(),
        # mean over routed tokens; an expert never routed to scores 0
        "reap": torch.where(st.count > 0, st.weighted_norm / st.count.clamp(min=1), torch.zeros_like(st.count)),
        "ean": st.norm.clone(),
        "soft": st.prob / tokens,
    }


def contrastive_scores(task: RoutingStats, others: Sequence[RoutingStats]) -> torch.Tensor:
    """Routing rate on ``task`` minus the rate on the pooled ``others`` (``[L, E]``).

    The rate is the fraction of a layer's routing slots (tokens × top-k) that go to each expert.
    With no other tasks, the reference is the uniform rate 1/E.
    """
    rate = task.count / task.count.sum(1, keepdim=True).clamp(min=1)
    if not others:
        return rate - 1.0 / task.num_experts
    pooled = sum((o.count for o in others), torch.zeros_like(task.count))
    ref = pooled / pooled.sum(1, keepdim=True).clamp(min=1)
    return rate - ref


def ablation_scores(layers: Sequence[int], num_experts: int, loss_with_mask: Callable[[dict | None], float],
                    progress: Callable[[], None] | None = None, skip_invalid: bool = False) -> torch.Tensor:
    """Rise in task loss when each expert alone is masked in its layer (``[L, E]``).

    Args:
        loss_with_mask: returns the task loss on the calibration split with the given keep-set
            applied (``None`` = the full model). It is called ``1 + L·E`` times.
        skip_invalid: when removing one expert is not a valid keep-set for the family (e.g.
            unbalanced routing groups), score 0 instead of failing.
    """
    from moeharden.errors import KeepSetError

    base = loss_with_mask(None)
    out = torch.zeros(len(layers), num_experts, dtype=torch.float64)
    for row, layer in enumerate(layers):
        for e in range(num_experts):
            keep = {layer: [j for j in range(num_experts) if j != e]}
            try:
                out[row, e] = loss_with_mask(keep) - base
            except KeepSetError:
                if not skip_invalid:
                    raise
            if progress is not None:
                progress()
    return out


def keep_sets(scores: torch.Tensor, layers: Sequence[int], keep: int, *,
              ranking: str = "per_layer", groups: int = 1) -> dict[int, list[int]]:
    """The ``keep`` highest-scoring experts in every layer (same count in every layer).

    ``per_layer`` (default) ranks each layer's row on its own. ``global`` builds one ranking of
    expert ids for the whole model: each layer's scores become that layer's shares (min-shifted,
    so negative contrastive/ablation scores work), the shares are summed over layers per expert id,
    and the same top-``keep`` ids are kept in every layer. With group-limited routing
    (``groups`` > 1) the ranking runs inside each group and keeps ``keep / groups`` per group.
    Ties break towards the lower expert id, so results are deterministic.

    Raises:
        KeepSetError: ``keep`` outside ``1..E`` or not divisible by ``groups``.
        ValueError: an unknown ranking (a programming error: callers pass a fixed choice).
    """
    from moeharden.errors import KeepSetError

    L, E = scores.shape
    if not 1 <= keep <= E or keep % groups:
        raise KeepSetError(f"Cannot keep {keep} of {E} experts per layer in {groups} routing group(s).",
                           hint=f"Keep between 1 and {E} experts, a multiple of {groups}.")
    s = scores.double()
    size, per = E // groups, keep // groups
    if ranking == "per_layer":
        out = {}
        for row, layer in enumerate(layers):
            ids: list[int] = []
            for g in range(groups):
                members = range(g * size, (g + 1) * size)
                ids += sorted(members, key=lambda e, r=row: (-float(s[r, e]), e))[:per]
            out[layer] = sorted(ids)
        return out
    if ranking != "global":
        raise ValueError(f"unknown ranking {ranking!r}; use per_layer or global")
    shifted = s - s.min(1, keepdim=True).values
    share = (shifted / shifted.sum(1, keepdim=True).clamp(min=1e-12)).sum(0)   # [E]
    ids = []
    for g in range(groups):
        ids += sorted(range(g * size, (g + 1) * size), key=lambda e: (-float(share[e]), e))[:per]
    return {layer: sorted(ids) for layer in layers}


def token_groups(lengths: Sequence[int], batch_size: int, max_tokens: int | None) -> list[list[int]]:
    """Consecutive row indices packed into forwards of at most ``batch_size`` rows and, padded to the
    longest row of the group, at most ``max_tokens`` tokens (a longer row goes alone); None: rows only.

    The activations of one forward grow with rows × padded length (an MoE layer holds top-k copies
    of every token's intermediate), so the budget bounds the pass's transient memory whatever the
    prompt lengths and model size; the summed statistics do not depend on the grouping.
    """
    groups: list[list[int]] = []
    cur: list[int] = []
    longest = 0
    for i, n in enumerate(lengths):
        grown = max(longest, int(n))
        if cur and (len(cur) >= batch_size or (max_tokens is not None and grown * (len(cur) + 1) > max_tokens)):
            groups.append(cur)
            cur, grown = [], int(n)
        cur.append(i)
        longest = grown
    if cur:
        groups.append(cur)
    return groups


def token_budget(model, *, share: float = AUTO_TOKENS_SHARE, floor: int = MAX_BATCH_TOKENS,
                 cap: int = AUTO_TOKENS_CAP) -> int:
    """The attribution pass's padded tokens per forward for ``model`` (scan's default ``--max-batch-tokens``).

    An MoE layer's pass holds, per routed (token, slot) pair, its input and output ``[H]`` and its
    expert's intermediates — ``P_e / H`` values for an expert of ``P_e`` parameters (``3·I`` for a
    gated one of width ``I``) — so one token costs ``k · (P_e / H + 2H)`` values at the experts'
    dtype (``k = E`` where every expert runs on every token, Llama-4). The budget is as many tokens as
    keep that under ``share`` of the model's weight bytes, within ``[floor, cap]``: a truncated or
    small model gets the floor (its transient is bounded in absolute terms), a model at released size
    forwards as many tokens at once as a plain forward would (measured figures: bench/scale.py and
    docs/attacks-and-defenses.md §1).
    """
    from moeharden.model.registry import moe_layers

    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    per_token = 0
    for li in moe_layers(model):
        params = list(li.experts.parameters())
        if not params:
            continue
        H = int(li.router_weight.shape[-1])
        per_expert = sum(p.numel() for p in params) // li.num_experts
        k = li.num_experts if li.spec.weight_on_input else li.top_k
        per_token = max(per_token, k * (per_expert // H + 2 * H) * params[0].element_size())
    if per_token == 0:
        return floor
    return int(min(cap, max(floor, share * weight_bytes // per_token)))


@torch.no_grad()
def routing_stats(model, tokenizer, texts: Sequence[str], layers: list[int], num_experts: int,
                  batch_size: int = 32, max_length: int = 512, max_tokens: int | str | None = "auto"):
    """One pass over ``texts`` with the routing record (norms included); returns summed stats.

    Only the decoder stack runs (``model.base_model``): routing never depends on the LM head, and
    its ``[B, T, vocab]`` logits would cost more than an MoE layer at real vocabulary sizes. Rows
    are packed by :func:`token_groups` (at most ``batch_size`` rows and ``max_tokens`` padded
    tokens per forward; ``"auto"``: :func:`token_budget`), so memory stays bounded at real width and
    prompt length; after every forward the heaps' freed activation blocks go back to the system
    (:func:`moeharden.io.allocator.release_free_memory`).
    """
    from moeharden.io.allocator import release_free_memory
    from moeharden.model.routing import record_routing

    total = None
    device = next(model.parameters()).device
    decoder = getattr(model, "base_model", model)
    texts = list(texts)
    if max_tokens == "auto":
        max_tokens = token_budget(model)
    lengths = [len(ids) for ids in tokenizer(texts, truncation=True, max_length=max_length)["input_ids"]]
    for group in token_groups(lengths, batch_size, max_tokens):
        enc = tokenizer([texts[i] for i in group], return_tensors="pt", padding=True, truncation=True,
                        max_length=max_length)
        enc = {k: v.to(device) for k, v in enc.items() if k in ("input_ids", "attention_mask")}
        with record_routing(model, norms=True, attention_mask=enc["attention_mask"]) as rec:
            decoder(**enc)
        st = stats_from_record(rec, layers, num_experts)
        total = st if total is None else merge_stats(total, st)
        del rec, enc
        release_free_memory()      # the forward's freed activations leave the process (io/allocator.py)
    return total
