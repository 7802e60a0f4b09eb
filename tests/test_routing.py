"""Routing record and masking on tiny models of every family, against independent computations.

The reference routing below is written from each family's published routing rule (softmax or
sigmoid, bias-based and group-limited selection, renormalisation, scaling), applied to the
router's raw weights and the MoE block's input captured with a plain forward hook — for the 15
hand-configured families (``HAND_FAMILIES``); every other family's routing is checked against the
registry's declared rule from the router's own logits in ``tests/test_discovery.py``. Expert
output norms are hand-computed for every family whose experts are a fused SwiGLU (and for the
custom layouts below); everything else here runs on every supported family.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from families import FAMILIES, HAND_FAMILIES, build_tiny

from moeharden.model.disk import pruned_config
from moeharden.model.keepset import check_keep_counts, valid_keep
from moeharden.model.masking import mask_experts
from moeharden.model.registry import moe_layers, spec_for_config
from moeharden.model.routing import record_routing


def _topk_renorm(p, k, renorm=True):
    w, i = p.topk(k, -1)
    return i, (w / w.sum(-1, keepdim=True) if renorm else w)


def _phimoe(s, eps):
    m1, i1 = s.max(-1, keepdim=True)
    mask = ((m1 - s) / s.abs().clamp(min=m1)) > 2 * eps
    g1 = torch.softmax(s.masked_fill(mask, float("-inf")), -1).gather(-1, i1)
    s2 = s.scatter(-1, i1, float("-inf"))
    m2, i2 = s2.max(-1, keepdim=True)
    mask2 = ((m2 - s) / s.abs().clamp(min=m2)) > 2 * eps
    g2 = torch.softmax(s2.masked_fill(mask2, float("-inf")), -1).gather(-1, i2)
    return torch.cat([i1, i2], -1), torch.cat([g1, g2], -1)


def _grouped(scores_for_choice, n_group, topk_group, group_score):
    T, E = scores_for_choice.shape
    g = scores_for_choice.view(T, n_group, E // n_group)
    gs = g.max(-1).values if group_score == "max" else g.topk(2, -1).values.sum(-1)
    keep = torch.zeros(T, n_group).scatter(1, gs.topk(topk_group, -1).indices, 1.0)
    return keep.repeat_interleave(E // n_group, dim=1).bool()


def reference_routing(family, li, cfg, x):
    """(indices [T,k], weights [T,k]) of one MoE layer for block input ``x`` [T, H], from scratch."""
    W = li.router_weight.detach().float()
    logits = x.float() @ W.T
    if li.router_bias is not None:
        logits = logits + li.router_bias.detach().float()
    k = li.top_k
    if family in ("mixtral", "minimax", "hunyuan_v1_moe"):
        return _topk_renorm(logits.softmax(-1), k)
    if family in ("qwen2_moe", "qwen3_moe", "olmoe"):
        return _topk_renorm(logits.softmax(-1), k, renorm=bool(cfg.norm_topk_prob))
    if family in ("granitemoe", "gpt_oss"):
        v, i = logits.topk(k, -1)
        return i, v.softmax(-1)
    if family == "llama4_text":
        v, i = logits.topk(k, -1)
        return i, torch.sigmoid(v)
    if family == "phimoe":
        return _phimoe(logits, cfg.router_jitter_noise)
    if family == "dbrx":
        v, i = logits.softmax(-1).topk(k, -1)
        p = cfg.ffn_config.moe_normalize_expert_weights
        return i, v / v.norm(p=p, dim=-1, keepdim=True)
    if family == "deepseek_v2":
        p = logits.softmax(-1)
        p = p.masked_fill(~_grouped(p, cfg.n_group, cfg.topk_group, "max"), 0.0)
        v, i = p.topk(k, -1)
        return i, v * cfg.routed_scaling_factor
    if family in ("deepseek_v3", "glm4_moe"):
        s = torch.sigmoid(logits)
        choice = s + li.selection_bias.detach().float()
        choice = choice.masked_fill(~_grouped(choice, cfg.n_group, cfg.topk_group, "top2sum"), float("-inf"))
        i = choice.topk(k, -1).indices
        w = s.gather(1, i)
        if cfg.norm_topk_prob:
            w = w / (w.sum(-1, keepdim=True) + 1e-20)
        return i, w * cfg.routed_scaling_factor
    if family == "ernie4_5_moe":
        p = logits.softmax(-1)
        i = (p + li.selection_bias.detach().float().reshape(1, -1)).topk(k, -1).indices
        w = p.gather(1, i)
        return i, w / w.sum(-1, keepdim=True).clamp(min=cfg.moe_norm_min)
    raise AssertionError(family)


SIGMOID = {"deepseek_v3", "glm4_moe", "llama4_text"}


def _as_dicts(idx, w):
    return [dict(sorted(zip(i.tolist(), ww.tolist(), strict=True))) for i, ww in zip(idx, w, strict=True)]


@pytest.fixture(scope="module", params=FAMILIES)
def tiny(request):
    model, cfg = build_tiny(request.param)
    return request.param, model, cfg


@pytest.fixture(scope="module", params=HAND_FAMILIES)
def hand_tiny(request):
    model, cfg = build_tiny(request.param)
    return request.param, model, cfg


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 64, (2, 7), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    return ids, mask


def test_recorded_weights_match_reference_routing(hand_tiny):
    family, model, cfg = hand_tiny
    layers = moe_layers(model)
    captured = {}
    hooks = [li.block.register_forward_pre_hook(
        lambda m, a, li=li: captured.__setitem__(li.layer, a[0].detach().reshape(-1, a[0].shape[-1])))
        for li in layers]
    ids, mask = _inputs()
    with torch.no_grad(), record_routing(model, norms=False, attention_mask=mask) as rec:
        model(input_ids=ids, attention_mask=mask)
    for h in hooks:
        h.remove()
    keep = mask.reshape(-1).bool()
    for li in layers:
        ref_i, ref_w = reference_routing(family, li, cfg, captured[li.layer][keep])
        got = _as_dicts(rec.layers[li.layer].indices, rec.layers[li.layer].weights)
        want = _as_dicts(ref_i, ref_w)
        assert len(got) == int(mask.sum())               # padding excluded
        for g_row, w_row in zip(got, want, strict=True):
            assert g_row.keys() == w_row.keys()
            for e in g_row:
                assert g_row[e] == pytest.approx(w_row[e], rel=1e-4, abs=1e-5)
        # probs: the family's score function of the full router logits (sigmoid or softmax)
        x = captured[li.layer][keep].float()
        logits = x @ li.router_weight.detach().float().T
        if li.router_bias is not None:
            logits = logits + li.router_bias.detach().float()
        want_p = logits.sigmoid() if family in SIGMOID else logits.softmax(-1)
        torch.testing.assert_close(rec.layers[li.layer].probs, want_p, rtol=1e-4, atol=1e-6)


def test_record_with_norms_leaves_the_forward_unchanged(tiny):
    _, model, _ = tiny
    ids, mask = _inputs(1)
    with torch.no_grad():
        plain = model(input_ids=ids, attention_mask=mask).logits
        with record_routing(model, norms=True, attention_mask=mask) as rec:
            hooked = model(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(hooked, plain, rtol=0, atol=1e-6)   # bit-equal with grouped_mm experts
    for r in rec.layers.values():
        assert r.norms is not None and r.norms.shape == r.indices.shape and bool((r.norms > 0).all())
        assert r.probs is not None and r.probs.shape[0] == r.indices.shape[0]


def test_mask_never_selects_hidden_experts_and_changes_logits(tiny):
    _, model, _ = tiny
    layers = moe_layers(model)
    ids, mask = _inputs(2)
    with torch.no_grad(), record_routing(model, norms=False) as before:
        plain = model(input_ids=ids, attention_mask=mask).logits
    from moeharden.errors import KeepSetError
    from moeharden.model.keepset import check_keep_counts

    used = before.layers[layers[0].layer].indices.reshape(-1).bincount(minlength=8)
    hide: list[int] = []
    for e in used.argsort(descending=True).tolist():              # experts the model was using most
        trial = {li.layer: [j for j in range(li.num_experts) if j not in hide + [e]] for li in layers}
        try:
            check_keep_counts(layers[0].spec, model.config, trial, balanced=False)
        except KeepSetError:
            continue
        hide.append(e)
        if len(hide) == 3:
            break
    keep = {li.layer: [e for e in range(li.num_experts) if e not in hide] for li in layers}
    with torch.no_grad(), mask_experts(model, keep), record_routing(model, norms=False) as rec:
        masked = model(input_ids=ids, attention_mask=mask).logits
    for li in layers:
        assert not set(rec.layers[li.layer].indices.reshape(-1).tolist()) & set(hide)
    assert (masked - plain).abs().max() > 1e-3
    with torch.no_grad():                                         # restored on exit
        torch.testing.assert_close(model(input_ids=ids, attention_mask=mask).logits, plain)


def test_mask_below_top_k_caps_top_k(tiny):
    from moeharden.model.keepset import valid_keep

    _, model, cfg = tiny
    layers = moe_layers(model)
    k = min(k for k in range(1, 9) if valid_keep(layers[0].spec, cfg, k))
    if k >= layers[0].top_k:
        pytest.skip(f"{layers[0].spec.name}: top-k is {layers[0].top_k} and the fewest valid kept experts {k}, "
                    "so no keep-set is below top-k")
    keep = {li.layer: [1] for li in layers}
    ids, mask = _inputs(3)
    with torch.no_grad(), mask_experts(model, keep), record_routing(model, norms=False) as rec:
        out = model(input_ids=ids, attention_mask=mask).logits
    assert torch.isfinite(out).all()
    for li in layers:      # null experts (LongCat-Flash) stay routable beside the one kept expert
        null = set(range(li.num_experts, li.router_rows))
        assert rec.layers[li.layer].indices.shape[1] == min(li.top_k, 1 + li.routable_null)   # Inkling: gates
        got = set(rec.layers[li.layer].indices.reshape(-1).tolist())
        assert 1 in got and got <= {1} | null


def _swiglu(x, w_gate, w_up, w_down, act=F.silu):
    return (act(x @ w_gate) * (x @ w_up)) @ w_down


def _expert_out_fused(ex, e, x):
    """Most families: gate_up_proj [E, 2I, H], down_proj [E, H, I] (Aria: [E, H, 2I], [E, I, H])."""
    H = x.shape[-1]
    act = getattr(ex, "act_fn", F.silu)                                # the family's activation (GELU, ...)
    if ex.gate_up_proj.shape[1] == H and ex.gate_up_proj.shape[2] != H:      # transposed layout
        g, u = ex.gate_up_proj[e].chunk(2, -1)
        return _swiglu(x, g, u, ex.down_proj[e], act)
    g, u = ex.gate_up_proj[e].chunk(2, 0)
    return _swiglu(x, g.T, u.T, ex.down_proj[e].T, act)


def _expert_out_gpt_oss(ex, e, x):
    gu = x @ ex.gate_up_proj[e] + ex.gate_up_proj_bias[e]             # [.., 2I], gate/up interleaved
    gate, up = gu[..., ::2].clamp(max=ex.limit), gu[..., 1::2].clamp(-ex.limit, ex.limit)
    return ((up + 1) * gate * torch.sigmoid(gate * ex.alpha)) @ ex.down_proj[e] + ex.down_proj_bias[e]


def _expert_out_dbrx(ex, e, x):
    rows = slice(e * 24, (e + 1) * 24)                                 # flattened [E*I, H]
    return _swiglu(x, ex.mlp.w1[rows].T, ex.mlp.v1[rows].T, ex.mlp.w2[rows])


def _expert_out_llama4(ex, e, x):
    g, u = ex.gate_up_proj[e].chunk(2, -1)                             # [H, 2I] -> 2 x [H, I]
    return _swiglu(x, g, u, ex.down_proj[e])


HAND = {"gpt_oss": _expert_out_gpt_oss, "dbrx": _expert_out_dbrx, "llama4_text": _expert_out_llama4}


def test_recorded_norms_match_hand_computed_expert_mlp(tiny):
    family, model, _ = tiny
    expert_fn = HAND.get(family, _expert_out_fused)
    layers = moe_layers(model)
    if family not in HAND and layers[0].spec.expert_mlp != "swiglu":
        pytest.skip(f"{layers[0].spec.name}: experts are not a fused SwiGLU (no hand computation here)")
    captured = {}
    hooks = [li.block.register_forward_pre_hook(
        lambda m, a, li=li: captured.__setitem__(li.layer, a[0].detach().reshape(-1, a[0].shape[-1])))
        for li in layers]
    ids, _ = _inputs(4)
    with torch.no_grad(), record_routing(model, norms=True) as rec:
        model(input_ids=ids)
    for h in hooks:
        h.remove()
    with torch.no_grad():
        for li in layers:
            r = rec.layers[li.layer]
            x = captured[li.layer]
            for t in range(0, x.shape[0], 3):
                for s in range(r.indices.shape[1]):
                    e, w = int(r.indices[t, s]), float(r.weights[t, s])
                    if e >= li.num_experts:       # a null expert: the identity (LongCat-Flash) or nothing (ZAYA)
                        want = float(x[t].norm()) if li.spec.null_output == "identity" else 0.0
                    elif li.spec.weight_on_input:   # Llama-4: ‖f(g·x)‖ / g, the contribution's norm over g
                        want = float(expert_fn(li.experts, e, w * x[t]).norm()) / w
                    else:
                        want = float(expert_fn(li.experts, e, x[t]).norm())
                    assert float(r.norms[t, s]) == pytest.approx(want, rel=1e-4, abs=1e-6)


# --------------------------------------------------------------------------- mask == physical prune
def _physically_pruned(model, cfg, keep, kept):
    """A fresh model from ``pruned_config`` whose weights are the loaded model's, sliced to ``keep``
    along the expert axis per the module view (fused [E, ...] or flattened [E*I, H] experts,
    router rows, selection-bias entries). No disk IO: validates masking and pruned_config alone."""
    spec = spec_for_config(cfg)
    new_cfg = type(cfg).from_dict(pruned_config(spec, cfg.to_dict(), kept))
    roles, router = {}, set()
    for li in moe_layers(model):
        for p in li.experts.parameters():
            roles[id(p)] = li
        for t in (li.router_weight, li.router_bias, li.selection_bias):
            if t is not None:
                roles[id(t)] = li
                router.add(id(t))
        for name, t in li.router.named_parameters():          # further [E] vectors (Gemma-4's per-expert scale)
            if f"{li.spec.router_attr}.{name}".endswith(li.spec.expert_vectors or ("\0",)):
                roles[id(t)] = li
    sd = {}
    for name, t in model.state_dict(keep_vars=True).items():
        li, is_router = roles.get(id(t)), id(t) in router
        t = t.detach()
        if li is not None and li.num_null and is_router and li.router_rows in (t.shape[0], t.shape[-1]):   # router rows:
            # kept experts, then every null one (Inkling's selection bias has the routed experts' rows only)
            axis = 0 if t.shape[0] == li.router_rows else t.dim() - 1
            t = t.index_select(axis, torch.tensor(keep[li.layer] + list(range(li.num_experts, li.router_rows))))
        elif li is not None:
            E, idx = li.num_experts, torch.tensor(keep[li.layer])
            axis = 0 if t.shape[0] % E == 0 and t.dim() > 1 or t.dim() == 1 else t.dim() - 1   # [1, E]: last
            if t.shape[axis] == E:
                t = t.index_select(axis, idx)
            else:                                      # flattened [E*I, H] (DBRX)
                t = t.reshape(E, -1, *t.shape[1:])[idx].reshape(-1, *t.shape[1:])
        sd[name] = t.clone()
    pruned = type(model)(new_cfg).float().eval()
    pruned.load_state_dict(sd, strict=True)
    return pruned


def _busy_keep(model, cfg, kept):
    """Per layer, ``kept`` experts (equally many per routing group) that are the LEAST used, so the
    mask removes experts the model was really using; layers keep different sets."""
    from moeharden.model.selfcheck import choose_keep

    ids, _ = _inputs(5)
    with torch.no_grad(), record_routing(model, norms=False, probs=False) as rec:
        model(input_ids=ids)
    return choose_keep(model, cfg, rec, kept)


@pytest.mark.parametrize("kept", ["half", "fewest"])
def test_masked_model_equals_in_memory_pruned_model(tiny, kept):
    _, model, cfg = tiny
    spec = moe_layers(model)[0].spec
    n = 4 if kept == "half" else min(k for k in range(1, 9) if valid_keep(spec, cfg, k))
    if kept == "fewest" and n == 4:
        pytest.skip(f"{spec.name}: the fewest valid experts is already 4")
    keep = _busy_keep(model, cfg, n)
    check_keep_counts(spec, cfg, keep)
    pruned = _physically_pruned(model, cfg, keep, n)
    ids, mask = _inputs(6)
    with torch.no_grad():
        plain = model(input_ids=ids, attention_mask=mask).logits
        with mask_experts(model, keep):
            masked = model(input_ids=ids, attention_mask=mask).logits
        got = pruned(input_ids=ids, attention_mask=mask).logits
    assert (masked - plain).abs().max() > 1e-3, "the mask should remove experts the model was using"
    assert (got - masked).abs().max() <= 1e-4
    assert [li.top_k for li in moe_layers(pruned)] == [min(li.top_k, n + li.routable_null) for li in moe_layers(model)]


def test_record_nested_in_mask_sees_only_kept_experts():
    model, cfg = build_tiny("qwen3_moe")
    keep = _busy_keep(model, cfg, 4)
    ids, mask = _inputs(7)
    with torch.no_grad():
        with mask_experts(model, keep):
            masked = model(input_ids=ids, attention_mask=mask).logits
            with record_routing(model, norms=True, attention_mask=mask) as rec:
                hooked = model(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(hooked, masked, rtol=0, atol=1e-5)
    for layer, r in rec.layers.items():
        hidden = [e for e in range(8) if e not in keep[layer]]
        assert not set(r.indices.reshape(-1).tolist()) & set(hidden)
        assert float(r.probs[:, hidden].abs().max()) == 0.0            # probs follow the mask
        torch.testing.assert_close(r.probs.sum(-1), torch.ones(r.probs.shape[0]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe", "gpt_oss", "deepseek_v3", "olmoe"])
def test_grouped_mm_records_norms_inside_the_models_own_pass(family, dtype, monkeypatch):
    """With transformers' default ``grouped_mm`` experts the record takes the norms inside that one
    pass (no second expert pass, and less memory than the model's own), and records what the general
    path (each pair run again as its own row) records: the same experts and weights, norms within
    float rounding; the recorded forward is bit-identical to the plain one (the model's own
    grouped kernel), in float32 and bf16 — gpt_oss has transposed experts with biases."""
    from moeharden.model import routing

    model, _ = build_tiny(family)
    model = model.to(dtype).eval()
    assert model.config._experts_implementation == "grouped_mm"
    ids = torch.randint(3, 60, (2, 9), generator=torch.Generator().manual_seed(1))
    used = []
    real = routing._grouped_with_norms
    monkeypatch.setattr(routing, "_grouped_with_norms", lambda *a: used.append(1) or real(*a))
    monkeypatch.setattr(routing, "_TOKENS_PER_SUM", 4)                  # 18 tokens: 5 uneven chunks
    with torch.no_grad():
        plain = model(input_ids=ids).logits
        with record_routing(model) as fast:
            got = model(input_ids=ids).logits
    assert len(used) == len(fast.layers) and torch.equal(got, plain)
    monkeypatch.setattr(routing, "_grouped_with_norms", lambda *a: None)     # the general path
    with torch.no_grad(), record_routing(model) as general:
        model(input_ids=ids)
    tol = {"rtol": 1e-5, "atol": 1e-6} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 1e-3}
    for layer, r in general.layers.items():
        f = fast.layers[layer]
        assert torch.equal(f.indices, r.indices) and torch.equal(f.weights, r.weights)
        torch.testing.assert_close(f.norms, r.norms, **tol)
