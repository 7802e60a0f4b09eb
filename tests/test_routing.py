"""Routing record and masking on tiny models of every family, against independent computations.

The reference routing below is written from each family's published routing rule (softmax or
sigmoid, bias-based and group-limited selection, renormalisation, scaling), applied to the
router's raw weights and the MoE block's input captured with a plain forward hook.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from families import FAMILIES, build_tiny

from moeharden.registry import moe_layers
from moeharden.routing import mask_experts, record_routing


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


def _as_dicts(idx, w):
    return [dict(sorted(zip(i.tolist(), ww.tolist(), strict=True))) for i, ww in zip(idx, w, strict=True)]


@pytest.fixture(scope="module", params=FAMILIES)
def tiny(request):
    model, cfg = build_tiny(request.param)
    return request.param, model, cfg


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 64, (2, 7), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    return ids, mask


def test_recorded_weights_match_reference_routing(tiny):
    family, model, cfg = tiny
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


def test_record_with_norms_leaves_the_forward_unchanged(tiny):
    _, model, _ = tiny
    ids, mask = _inputs(1)
    with torch.no_grad():
        plain = model(input_ids=ids, attention_mask=mask).logits
        with record_routing(model, norms=True, attention_mask=mask) as rec:
            hooked = model(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(hooked, plain, rtol=0, atol=1e-5)
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
    from moeharden.registry import check_keep_counts

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
    from moeharden.registry import valid_keep

    _, model, cfg = tiny
    layers = moe_layers(model)
    k = min(k for k in range(1, 9) if valid_keep(layers[0].spec, cfg, k))
    if k >= layers[0].top_k:
        pytest.skip(f"{layers[0].spec.name} cannot run with fewer experts than its top-k")
    keep = {li.layer: [1] for li in layers}
    ids, mask = _inputs(3)
    with torch.no_grad(), mask_experts(model, keep), record_routing(model, norms=False) as rec:
        out = model(input_ids=ids, attention_mask=mask).logits
    assert torch.isfinite(out).all()
    for li in layers:
        assert rec.layers[li.layer].indices.shape[1] == 1
        assert set(rec.layers[li.layer].indices.reshape(-1).tolist()) == {1}


def _expert_out_mixtral(ex, e, x):
    g, u = (x @ ex.gate_up_proj[e].T).chunk(2, -1)
    return (F.silu(g) * u) @ ex.down_proj[e].T


def _expert_out_gpt_oss(ex, e, x):
    gu = x @ ex.gate_up_proj[e] + ex.gate_up_proj_bias[e]
    gate, up = gu[..., ::2].clamp(max=ex.limit), gu[..., 1::2].clamp(-ex.limit, ex.limit)
    return ((up + 1) * gate * torch.sigmoid(gate * ex.alpha)) @ ex.down_proj[e] + ex.down_proj_bias[e]


@pytest.mark.parametrize("family,expert_fn", [("mixtral", _expert_out_mixtral), ("gpt_oss", _expert_out_gpt_oss)])
def test_recorded_norms_match_hand_computed_expert_mlp(family, expert_fn):
    model, _ = build_tiny(family)
    layers = moe_layers(model)
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
                    e = int(r.indices[t, s])
                    want = float(expert_fn(li.experts, e, x[t]).norm())
                    assert float(r.norms[t, s]) == pytest.approx(want, rel=1e-4)
