"""How tokens were really routed: the routing record of a loaded model.

* :func:`record_routing` records, per MoE layer and (non-padding) token, the chosen experts and
  their combine weights **as the model computed them** — captured where the MoE block hands them
  to its experts module, never recomputed from logits (families differ: softmax or sigmoid,
  bias-based and group-limited selection, renormalisation, scaling) — plus each chosen expert's
  output norm, computed inside the normal expert pass (the model's own experts implementation
  runs once on the token-expert pairs, unweighted), so there is no extra expert compute.

Hiding experts on a loaded model is :mod:`moeharden.model.masking`.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field

import torch
from torch.overrides import TorchFunctionMode

from moeharden.model.registry import MoELayer, moe_layers


@dataclass
class LayerRecord:
    """Routing of one MoE layer over the recorded (non-padding) tokens.

    indices ``[T, k]`` long, weights ``[T, k]`` float (combine weights as used by the model),
    norms ``[T, k]`` (‖expert output‖₂ before weighting) or None, probs ``[T, E]`` or None (the
    family's score function — softmax or sigmoid — of the router logits; derived, for ``soft``).
    """

    indices: torch.Tensor | None = None
    weights: torch.Tensor | None = None
    norms: torch.Tensor | None = None
    probs: torch.Tensor | None = None


@dataclass
class RoutingRecord:
    """Per-layer routing records, keyed by decoder-layer index; calls append along tokens."""

    layers: dict[int, LayerRecord] = field(default_factory=dict)

    def _add(self, layer: int, **parts: torch.Tensor | None) -> None:
        rec = self.layers.get(layer)
        if rec is None:
            self.layers[layer] = LayerRecord(**{k: v for k, v in parts.items()})
            return
        for k, v in parts.items():
            if v is not None:
                old = getattr(rec, k)
                setattr(rec, k, v if old is None else torch.cat([old, v]))


def _keep_rows(mask: torch.Tensor | None, n: int) -> torch.Tensor | None:
    if mask is None:
        return None
    flat = mask.reshape(-1).bool()
    if flat.numel() != n:      # e.g. generation steps with a KV cache: no per-token mask known
        return None
    return flat.to("cpu")


def _sel(t: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
    t = t.detach().to("cpu")
    return t if rows is None else t[rows]


def _probs(li: MoELayer, router_out) -> torch.Tensor:
    """``[T, E]`` score function of the router logits the router returned (masked ones included); the
    scores of null experts (router rows after the ``E`` experts') are left out."""
    logits = router_out[li.spec.logits_at] if isinstance(router_out, (tuple, list)) else router_out
    logits = logits.detach().float()
    logits = logits.reshape(-1, logits.shape[-1])     # [T, E] or [T, E + null rows]
    if li.spec.score == "sigmoid":
        p = torch.sigmoid(logits)
    elif li.spec.score == "probs":       # the router already returns probabilities
        p = logits
    else:
        p = logits.T.softmax(0).T        # same values; softmax over a short last dim is ~7x slower on CPU
    return p[:, :li.num_experts] if p.shape[1] > li.num_experts else p


@contextmanager
def record_routing(model, *, norms: bool = True, probs: bool = True,
                   attention_mask: torch.Tensor | None = None) -> Iterator[RoutingRecord]:
    """Record routing (and expert output norms) of every forward pass inside the block.

    Args:
        norms: also record each chosen expert's output norm (REAP/EAN need it).
        probs: also record the full routing distribution ``[T, E]``.
        attention_mask: ``[B, T]``; tokens where it is 0 are left out of the record.
    """
    rec = RoutingRecord()
    with ExitStack() as stack:
        for li in moe_layers(model):
            if li.spec.weight_on_input:
                stack.enter_context(_record_dense_input_scaled(li, rec, norms, probs, attention_mask))
            else:
                stack.enter_context(_record_sparse(li, rec, norms, probs, attention_mask))
        yield rec


def _row_norms(y: torch.Tensor, chunk: int = 512) -> torch.Tensor:
    """``‖y_i‖₂`` of every row of ``y [N, H]`` in float32 (``[N]``), a few hundred rows at a time.

    A float32 copy of a whole bf16 ``[T·k, H]`` output would cost as much memory as the output
    itself and stream it through memory twice; chunks stay in cache (measured: bench/scale.py).
    """
    out = torch.empty(y.shape[0], dtype=torch.float32, device=y.device)
    for i in range(0, y.shape[0], chunk):
        out[i:i + chunk] = torch.linalg.vector_norm(y[i:i + chunk], dim=-1, dtype=torch.float32)
    return out


@contextmanager
def _record_sparse(li: MoELayer, rec: RoutingRecord, norms: bool, probs: bool, mask):
    """Families whose block calls ``experts(hidden, top_k_index, top_k_weights)``.

    With ``norms``, the experts module's own forward (whatever implementation the model uses:
    grouped_mm, batched_mm or the eager loop) is called once on the ``T·k`` (token, slot) pairs as
    rows of their own, each routed to its one expert with weight 1: that is exactly the expert
    compute of the normal forward, and it returns every pair's *unweighted* output ``[T·k, H]``.
    Its norms are recorded, then the outputs are weighted and summed over the k slots as the
    model does. Where the model runs transformers' ``grouped_mm`` experts (the default), the pass
    is that one instead, with the norms read inside it (:func:`_grouped_with_norms`).

    A family with null experts (LongCat-Flash, ZAYA) hands its experts module remapped pairs (a
    null pick becomes a real expert id with weight 0); the record holds the router's own choice
    instead — the indices its ``torch.topk`` returned (ids ``E …`` for null experts), the weights
    of its output — and a null pick's norm is what it adds unweighted: the token's own norm
    (``identity``) or 0 (``zero``).
    """
    experts = li.experts
    orig = experts.forward
    own = experts.__dict__.get("forward")     # an instance-level forward (accelerate hooks) to restore
    _ones: dict[str, torch.Tensor] = {}
    choice: dict[str, torch.Tensor] = {}
    handles = []
    if probs:
        def router_post(module, args, output):
            p = _probs(li, output)
            rec._add(li.layer, probs=_sel(p, _keep_rows(mask, p.shape[0])))
        handles.append(li.router.register_forward_hook(router_post))
    router_own = li.router.__dict__.get("forward")
    if li.routable_null:
        def router_fwd(*args, _orig=li.router.forward, **kwargs):
            with _LastTopk() as seen:
                out = _orig(*args, **kwargs)
            choice["i"], choice["w"] = seen.indices, out[li.spec.router_weights_at]
            return out
        li.router.forward = router_fwd

    def record(idx, w, rows, nrm=None, flat=None):
        if "i" in choice:                                             # the router's own (null) picks
            idx, w = choice.pop("i").reshape(idx.shape), choice.pop("w").reshape(w.shape)
            if nrm is not None:
                null = idx >= li.num_experts
                own = _row_norms(flat.detach()).unsqueeze(-1) if li.spec.null_output == "identity" else 0.0
                nrm = torch.where(null, torch.as_tensor(own, dtype=nrm.dtype), nrm)
        rec._add(li.layer, indices=_sel(idx, rows), weights=_sel(w.float(), rows),
                 norms=None if nrm is None else _sel(nrm, rows))

    def forward(*args, **kwargs):
        hidden, top_k_index, top_k_weights = (list(args) + list(kwargs.values()))[:3]
        flat = hidden.reshape(-1, hidden.shape[-1])                   # [T, H]
        rows = _keep_rows(mask, flat.shape[0])
        if not norms:
            record(top_k_index, top_k_weights, rows)
            return orig(*args, **kwargs)
        T, k = top_k_index.shape
        fast = _grouped_with_norms(experts, flat, top_k_index, top_k_weights)
        if fast is not None:
            out, nrm = fast
            record(top_k_index, top_k_weights, rows, nrm, flat)
            return out.to(hidden.dtype).reshape(hidden.shape)
        pairs = flat.repeat_interleave(k, dim=0)                       # [T*k, H], row t*k+s = token t
        ones = _ones.get("t")
        if ones is None or ones.shape[0] < T * k or ones.dtype != top_k_weights.dtype or ones.device != flat.device:
            ones = _ones["t"] = torch.ones((T * k, 1), dtype=top_k_weights.dtype, device=flat.device)
        ones = ones[: T * k]                                            # reused across calls: no fill per call
        y = orig(pairs, top_k_index.reshape(-1, 1), ones).reshape(T * k, -1)   # [T*k, H] unweighted
        nrm = _row_norms(y.detach()).reshape(T, k)
        y3, w = y.view(T, k, -1), top_k_weights.unsqueeze(-1)           # [T, k, H], [T, k, 1]
        out = y3[:, 0] * w[:, 0]                                        # [T, H]; slot by slot, the same
        for s in range(1, k):                                           # sums as .sum(dim=1), but a
            out = out + y3[:, s] * w[:, s]                              # strided reduction is ~2x slower
        record(top_k_index, top_k_weights, rows, nrm, flat)
        return out.to(hidden.dtype).reshape(hidden.shape)

    experts.forward = forward
    try:
        yield
    finally:
        if own is None:
            del experts.forward                                      # back to the class method
        else:
            experts.forward = own
        if li.routable_null:
            if router_own is None:
                li.router.__dict__.pop("forward", None)
            else:
                li.router.forward = router_own
        for h in handles:
            h.remove()


_TOKENS_PER_SUM = 64     # tokens weighted and summed at once by the grouped record: a [64·k, H] fp32 copy that
                         # stays in cache (256: 12–14% slower at OLMoE width, bench/expert_pass.py)


def _grouped_with_norms(ex, hidden: torch.Tensor, idx: torch.Tensor, w: torch.Tensor):
    """The model's own ``grouped_mm`` expert pass, with each (token, slot) pair's unweighted output
    norm taken where the pass has it; ``(output [T, H], norms [T, k])``, or None where it does not
    apply (another experts implementation, expert parallelism, a layout without transformers'
    experts interface, or a transformers without its grouped kernel).

    Same operations, in the same order and dtypes, as transformers' ``grouped_mm`` experts forward
    (sort the pairs by expert, two grouped linears through transformers' own kernel dispatch, the
    class's gate, weight, restore the order, sum the k slots), so the output is the model's; the
    only extra work is one read of the unweighted outputs for their norms — not the second
    expert pass over repeated rows of the general path (measured: bench/scale.py).

    Its memory is less than the model's own pass: each ``[T·k, ·]`` intermediate is released as
    soon as the next exists, and the order is restored *before* weighting, 64 tokens at
    a time — each product is the same pair of numbers (``y[inv] * w`` is ``(y * w[perm])[inv]``
    element for element) and each token's k slots are summed alone, so no weighted ``[T·k, H]``
    copy (float32 where the weights are) or reordered one ever exists; what remains is the one
    sorted output ``y`` (measured at OLMoE width: bench/scale.py, scan's peak; tested
    bit-identical to the model's pass).
    """
    if (getattr(getattr(ex, "config", None), "_experts_implementation", None) != "grouped_mm"
            or getattr(ex, "_is_expert_parallel", True) or not hasattr(ex, "has_gate")
            or getattr(type(ex).forward, "__wrapped__", None) is None):
        return None      # a subclass's own forward does more than the dispatched pass (Ergo's per-expert norm)
    try:
        from transformers.integrations.moe import _grouped_linear
    except ImportError:
        return None
    T, k = idx.shape
    ids, weights = idx.reshape(-1), w.reshape(-1)
    ids_g, perm = torch.sort(ids)
    counts = torch.bincount(ids_g, minlength=ex.num_experts)[: ex.num_experts]
    offs = torch.cumsum(counts, dim=0, dtype=torch.int32)
    up = ex.gate_up_proj if ex.has_gate else ex.up_proj
    up_b = (ex.gate_up_proj_bias if ex.has_gate else ex.up_proj_bias)[ids_g] if ex.has_bias else None
    h = _grouped_linear(hidden[perm // k], up, offs, bias=up_b, is_transposed=ex.is_transposed)
    del up_b                                                             # [T·k, ·] per-row biases
    h = ex._apply_gate(h) if ex.has_gate else ex.act_fn(h)
    y = _grouped_linear(h, ex.down_proj, offs, bias=ex.down_proj_bias[ids_g] if ex.has_bias else None,
                        is_transposed=ex.is_transposed)
    del h
    if ex.has_post_expert_norm:
        y = ex.post_expert_norm(y)
    n_g = _row_norms(y.detach())                                         # [T*k], sorted by expert
    inv = torch.empty_like(perm)
    inv[perm] = torch.arange(perm.numel(), device=perm.device)
    out = y.new_empty((T, y.shape[-1]), dtype=torch.promote_types(y.dtype, weights.dtype))
    for t in range(0, T, _TOKENS_PER_SUM):                               # back in (token, slot) order,
        rows = inv[t * k:(t + _TOKENS_PER_SUM) * k]                      # weighted and summed over the
        part = (y[rows] * weights[t * k:(t + _TOKENS_PER_SUM) * k].unsqueeze(-1)).view(-1, k, y.shape[-1])
        out[t:t + part.shape[0]] = part.sum(dim=1)                       # k slots, a few tokens at a time
    return out, n_g[inv].view(T, k)


@contextmanager
def _record_dense_input_scaled(li: MoELayer, rec: RoutingRecord, norms: bool, probs: bool, mask):
    """Llama-4: the router returns per-expert scores ``[T, E]`` (0 off the top-k) that scale each
    expert's *input*, and every expert runs on every token; the record reads the router's scores
    and the experts' outputs at the chosen slots.

    The unscaled output f_e(x) is never computed by the model, so ``norms`` holds
    ‖f_e(g·x)‖ / g: the norm of the expert's real contribution divided by its combine weight, so
    that ``weights · norms`` is exactly the contribution's norm (what REAP scores).
    """
    state: dict[str, torch.Tensor] = {}
    handles = []

    def router_post(module, args, output):
        scores = output[0] if isinstance(output, tuple) else output     # [T, E], 0 off the top-k
        rows = _keep_rows(mask, scores.shape[0])
        k = min(int(getattr(module, "top_k", li.top_k)), li.num_experts)   # capped by a mask, if any
        w, idx = scores.detach().float().topk(k, dim=-1)                # [T, k]
        state["idx"], state["w"], state["rows"] = idx, w, rows
        rec._add(li.layer, indices=_sel(idx, rows), weights=_sel(w, rows),
                 probs=_sel(_probs(li, output), rows) if probs else None)

    def experts_post(module, args, output):
        if not norms or "idx" not in state:
            return
        idx, w, rows = state.pop("idx"), state.pop("w"), state.pop("rows")
        T = idx.shape[0]
        y = output.reshape(li.num_experts, T, -1)                      # [E, T, H] expert outputs f_e(g·x)
        n = y.detach().float().norm(dim=-1).T.gather(1, idx.to(y.device))   # [T, k]
        n = torch.where(w > 0, n / w.clamp(min=torch.finfo(torch.float32).tiny), torch.zeros_like(n))
        rec._add(li.layer, norms=_sel(n, rows))

    handles.append(li.router.register_forward_hook(router_post))
    handles.append(li.experts.register_forward_hook(experts_post))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


class _LastTopk(TorchFunctionMode):
    """Keeps the indices of the last ``torch.topk`` run inside it (a router's own selection)."""

    indices: torch.Tensor | None = None

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func in (torch.topk, torch.Tensor.topk):
            self.indices = out[1]
        return out
