"""The terms of the entanglement objective, each a function of model or router logits.

    L = λ_T · L_task(full) + λ_R · KL(p_orig ‖ p_θ) + λ_P · mean_S ℓ(θ_S) + λ_U · L_spread [+ λ_rec · ℓ(θ'_S)]

:func:`kl_retain` is the KL term, :func:`pruned_hinge` the bounded ℓ of a pruned sub-model,
:func:`pruned_divergence` the bounded push of a pruned sub-model's MoE-block outputs away from
the full model's (block outputs captured by :class:`BlockTap`), :func:`spread_loss` the per-task load balance (router logits captured by :class:`RouterTap`),
:func:`partition_routing` the routers' pull toward a fixed token partition,
and :func:`simulated_recovery` the optional TAR-style first-order simulated-recovery term. The
task term is the plain answer cross-entropy of :mod:`moeharden.tasks.encoding`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from moeharden.defend.entangle.recipe import EntangleRecipe
from moeharden.model.masking import mask_experts
from moeharden.tasks.encoding import answer_logits, choice_logprobs


def kl_retain(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over non-pad positions of KL(teacher ‖ student); logits ``[B, T, V]``, mask ``[B, T]``."""
    lt = torch.log_softmax(teacher.float(), -1)
    ls = torch.log_softmax(student.float(), -1)
    kl = (lt.exp() * (lt - ls)).sum(-1)            # [B, T]
    m = mask.float()
    return (kl * m).sum() / m.sum().clamp(min=1)


def pruned_hinge(logits: torch.Tensor, batch, recipe: EntangleRecipe) -> torch.Tensor:
    """Bounded anti-task term for a pruned sub-model's logits ``[B, T, V]``.

    Multiple choice (``batch.choice_ids`` set): ``ln C − H(p over the choices)``; otherwise per
    answer token ``relu(τ − CE)`` with τ = ``recipe.tau_token``. Both are 0 once the sub-model is
    at chance / past τ, so the pruned model is never trained to answer wrongly.
    """
    if batch.choice_ids is not None:
        # multiple choice: push the distribution over the choices to uniform (maximum entropy).
        # Bounded (0 at uniform) and, unlike a hinge on the correct choice's CE, it gives no
        # incentive to answer *wrongly* — a below-chance model leaks the task by inversion.
        lp = torch.log_softmax(choice_logprobs(logits, batch), -1)      # [B, C]
        ent = -(lp.exp() * lp).sum(-1)
        return (math.log(lp.shape[1]) - ent).mean()
    al, at = answer_logits(logits, batch.labels)
    ce = F.cross_entropy(al.float(), at, reduction="none")       # [N] per answer token
    return F.relu(recipe.tau_token - ce).mean()


def _router_logits(logits: torch.Tensor, li: Any, keep: torch.Tensor) -> torch.Tensor:
    """The routed experts' float32 logits ``[N, E]`` on the non-pad rows ``keep``, from what the router
    returned (``logits`` ``[N, E + null rows]``): null experts' and shared-expert gates' rows are left
    out, and a router that returns probabilities gives their logarithm (the same softmax)."""
    t = logits.reshape(-1, logits.shape[-1])[keep].float()[:, :li.num_experts]
    return t.clamp_min(1e-30).log() if li.spec.score == "probs" else t


def spread_loss(router_logits: Sequence[tuple[torch.Tensor, Any]], mask: torch.Tensor) -> torch.Tensor:
    """Σ_layers (E·Σ_e p̄_e² − 1) over one single-task batch (0 when routing is uniform over the E
    routed experts; p is the softmax of their logits).

    Args:
        router_logits: per MoE layer, (the router's logits ``[B·T, E (+ null rows)]`` with grad, MoELayer).
        mask: ``[B, T]`` attention mask (padding excluded).
    """
    total = torch.zeros((), dtype=torch.float32)
    keep = mask.reshape(-1).bool()
    for x, li in router_logits:
        pbar = torch.softmax(_router_logits(x, li, keep), -1).mean(0)          # [E]
        total = total + (pbar.numel() * (pbar ** 2).sum() - 1.0)
    return total


def partition_targets(token_ids: torch.Tensor, layer: int, num_experts: int, k: int, seed: int) -> torch.Tensor:
    """The ``k`` distinct experts a token id is assigned to in ``layer``: ``[N] -> [N, k]``.

    A keyed integer hash of (seed, layer, token id, expert) scores every expert; the ``k`` best
    are the token's experts. Deterministic, the same in every process, and computed per batch (no
    vocabulary-sized table), so it costs nothing at real vocabulary sizes.
    """
    v = token_ids.reshape(-1, 1).long()
    e = torch.arange(num_experts, dtype=torch.long, device=v.device).reshape(1, -1)
    h = v * 1_000_003 + e * 7_919 + (layer + 1) * 104_729 + (seed + 1) * 15_485_863
    for mult in (0x5BD1E995, 0x27D4EB2F):          # xor-shift-multiply rounds (int64 wraps around)
        h = (h ^ (h >> 15)) * mult
        h = h & 0x7FFFFFFFFFFF
    return torch.topk(h ^ (h >> 13), k, dim=-1).indices


def partition_routing(router_logits: Sequence[tuple[torch.Tensor, Any]], input_ids: torch.Tensor,
                      mask: torch.Tensor, seed: int) -> torch.Tensor:
    """Cross-entropy of every router toward a fixed token partition (mean over layers).

    For each MoE layer and non-pad token of id v: −(1/k) Σ_j log p(e_j), where p is the softmax of
    the router logits and e_1..e_k = :func:`partition_targets` (v, layer) — k is the layer's top-k.
    Experts are then specialised by *token*, by a partition that has nothing to do with the tasks:
    every task needs every expert (each holds the processing of its own share of the vocabulary),
    no keep-set is better than another, and an expert holds nothing of the tokens it is not
    assigned. Its minimum is log k (the router splits each token evenly over its k experts).

    Args:
        router_logits: per MoE layer, (the router's logits ``[B·T, E (+ null rows)]`` with grad, MoELayer).
        input_ids, mask: ``[B, T]`` token ids and attention mask (padding excluded).
        seed: the partition's key (the recipe's seed).
    """
    keep = mask.reshape(-1).bool()
    ids = input_ids.reshape(-1)[keep]
    total = torch.zeros((), dtype=torch.float32)
    for x, li in router_logits:
        target = partition_targets(ids, li.layer, li.num_experts, li.top_k, seed)
        lp = torch.log_softmax(_router_logits(x, li, keep), -1)
        total = total - lp.gather(1, target).mean()
    return total / max(1, len(router_logits))


def pruned_divergence(pruned: Sequence[torch.Tensor], full: Sequence[torch.Tensor], mask: torch.Tensor,
                      ratio: float) -> torch.Tensor:
    """Bounded push of a pruned sub-model's MoE-block outputs away from the full model's, per token.

    For each MoE layer l and non-pad token t: d = ‖y_S − y_full‖² / mean_t ‖y_full‖² (the full
    model's outputs are a fixed target, no gradient), and the term is mean relu(ρ − d), ρ = ``ratio``.
    Tokens whose routed experts are all kept give y_S = y_full exactly (the term cannot move them);
    on the others the *substitute* experts are pushed to write ρ^½ times a typical block output of
    something else — "entangled" in the literal sense: an expert's output is only benign on the tokens
    its router sends it, so any strict subset corrupts the residual stream instead of degrading
    gracefully. Bounded: 0 once the pruned outputs are that far away; the answers never enter it.

    Args:
        pruned, full: per MoE layer, block outputs ``[B, T, H]`` of the masked and the full forward.
        mask: ``[B, T]`` attention mask.
    """
    m = mask.reshape(-1).bool()
    total = torch.zeros((), dtype=torch.float32)
    for ys, yf in zip(pruned, full, strict=True):
        ys = ys.reshape(-1, ys.shape[-1])[m].float()
        yf = yf.reshape(-1, yf.shape[-1])[m].float().detach()
        scale = (yf ** 2).sum(-1).mean().clamp(min=1e-8)
        d = ((ys - yf) ** 2).sum(-1) / scale
        total = total + F.relu(ratio - d).mean()
    return total / max(1, len(pruned))


def pair_cancellation(taps: Sequence[tuple[Any, tuple, torch.Tensor]], mask: torch.Tensor, ratio: float) -> torch.Tensor:
    """Bounded push of each routed expert's own output away from the routed combination, per token.

    For each MoE layer, token and routed slot s: d_s = ‖E_s(x) − y(x)‖² / mean ‖y‖², where E_s is
    the slot's expert alone (weight 1) and y the block's experts output (a fixed target); the term
    is mean relu(ρ − d_s). Since y = Σ_t w_t E_t, E_s − y = Σ_{t≠s} w_t (E_s − E_t): the routed
    experts of a token are made to disagree strongly while their weighted sum stays what the full
    model needs — a cancellation structure, so a token that keeps only some of its experts gets
    a large wrong update, and the kept experts' own outputs are no usable starting point.

    Args:
        taps: per MoE layer, ``(experts module, (hidden [N, H], top-k index [N, k], weights [N, k]),
            output [N, H])`` as :class:`ExpertsTap` captured them (with grad).
        mask: ``[B, T]`` attention mask (N = B·T).
    """
    m = mask.reshape(-1).bool()
    total, n = torch.zeros((), dtype=torch.float32), 0
    for experts, (hidden, idx, weights), y in taps:
        yf = y.reshape(-1, y.shape[-1])[m].float().detach()
        scale = (yf ** 2).sum(-1).mean().clamp(min=1e-8)
        for s in range(idx.shape[-1]):
            one = torch.zeros_like(weights)
            one[:, s] = 1.0
            es = experts(hidden, idx, one).reshape(-1, y.shape[-1])[m].float()
            total = total + F.relu(ratio - ((es - yf) ** 2).sum(-1) / scale).mean()
            n += 1
    return total / max(1, n)


class _HookTap:
    """Base of the taps: the hook handles, removed when the ``with`` block ends."""

    def __init__(self, layers):
        self.layers = layers
        self.handles: list = []

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()
        return False


class ExpertsTap(_HookTap):
    """Context manager capturing each experts module's inputs (hidden, top-k index, weights) and output.

    Families whose experts module is called as ``experts(hidden, top_k_index, top_k_weights)``
    (transformers 5's fused-experts convention) only; other calls raise InputError.
    """

    def __init__(self, layers):
        super().__init__(layers)
        self.taps: list[tuple[Any, tuple, torch.Tensor]] = []

    def __enter__(self):
        from moeharden.errors import InputError

        for li in self.layers:
            def post(module, args, out, li=li):
                if len(args) != 3 or not all(isinstance(a, torch.Tensor) for a in args):
                    raise InputError(f"The {li.spec.name} experts module is not called as experts(hidden, index, "
                                     "weights); the cancellation term (lambda_cancel) does not apply to it.",
                                     hint="Set lambda_cancel: 0 in the recipe.")
                self.taps.append((module, args, out))
            self.handles.append(li.experts.register_forward_hook(post))
        return self



class BlockTap(_HookTap):
    """Context manager capturing each MoE block's output (with grad) during a forward pass."""

    def __init__(self, layers):
        super().__init__(layers)
        self.outputs: list[torch.Tensor] = []

    def __enter__(self):
        for li in self.layers:
            def post(module, args, out):
                self.outputs.append(out[0] if isinstance(out, tuple) else out)
            self.handles.append(li.block.register_forward_hook(post))
        return self



class RouterTap(_HookTap):
    """Context manager capturing the logits each router returns (with grad) during a forward pass.

    The router's own output (position ``logits_at`` of its tuple), not a projection recomputed
    from its input: routers that normalise or scale their input first (Gemma-4), or score through
    an MLP (ZAYA), route by what they return.

    Args:
        layers: the model's :func:`moeharden.model.registry.moe_layers`; ``logits`` collects
            ``(router logits, MoELayer)`` pairs in call order.
    """

    def __init__(self, layers):
        super().__init__(layers)
        self.logits: list[tuple[torch.Tensor, Any]] = []

    def __enter__(self):
        for li in self.layers:
            def post(module, args, out, li=li):
                self.logits.append((out[li.spec.logits_at] if isinstance(out, (tuple, list)) else out, li))
            self.handles.append(li.router.register_forward_hook(post))
        return self



def simulated_recovery(model, base, batch, held, keep, recipe: EntangleRecipe, accel, n_units: int, inner: str,
                       full_logits: torch.Tensor) -> float:
    """TAR-style first-order term: simulate the attacker re-aligning the pruned model, penalise what it recovers.

    ``recovery_steps`` attacker steps on ``batch`` (``inner`` = "labels": cross-entropy of the
    answers; "distill": KL from the full model's outputs, no labels); after each, the bounded ℓ of
    the updated sub-model on ``held`` (other examples) is back-propagated and its gradient — taken
    at the updated weights — is added at θ. θ is restored exactly afterwards, and gradients
    already accumulated in ``.grad`` are kept.

    Args:
        model: the (accelerate-prepared) model being trained; base: its unwrapped module (masked).
        batch, held: :class:`moeharden.tasks.encoding.LMBatch` es (attacker data, evaluation data).
        keep: the keep-set ``{layer: expert ids}`` of the sub-model.
        accel: the Accelerator; n_units: micro-batches one optimizer step sums (gradient scale).
        full_logits: ``[B, T, V]`` the full model's logits on ``batch`` (for ``distill``).
    Returns:
        the mean ℓ of the updated sub-models (for logging).
    """
    params = [p for p in model.parameters() if p.requires_grad]
    saved = [p.grad.detach().clone() if p.grad is not None else None for p in params]
    orig = [p.detach().clone() for p in params]
    for p in params:
        p.grad = None
    total = 0.0
    n = recipe.recovery_steps
    for _ in range(n):
        with mask_experts(base, keep), accel.autocast():
            logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
            if inner == "distill":
                atk = kl_retain(logits, full_logits, batch.attention_mask)
            else:
                al, at = answer_logits(logits, batch.labels)
                atk = F.cross_entropy(al.float(), at)
        grads = torch.autograd.grad(atk, params, allow_unused=True)
        with torch.no_grad():                           # θ_k+1 = θ_k − α·update(∇ attacker loss)
            for p, g in zip(params, grads, strict=True):
                if g is not None:
                    p.sub_(recipe.recovery_lr * (g.sign() if recipe.recovery_update == "sign" else g))
        with mask_experts(base, keep), accel.autocast():
            lp = pruned_hinge(model(input_ids=held.input_ids, attention_mask=held.attention_mask).logits,
                              held, recipe)
        accel.backward(recipe.lambda_recovery * lp / (n * n_units))   # gradient at θ_k+1, applied at θ
        total += float(lp.detach()) / n
    with torch.no_grad():
        for p, o, s in zip(params, orig, saved, strict=True):
            p.copy_(o)
            if s is not None:
                p.grad = s if p.grad is None else p.grad + s
    return total
