"""Attribution scores against an independent hand computation on a tiny real Mixtral.

The reference walks the model layer by layer with the raw weights: it recomputes each layer's
routing (softmax over router logits, top-2, renormalised) and each chosen expert's SwiGLU output
from ``gate_up_proj``/``down_proj``, then forms frequency / gate / REAP / EAN / soft by hand.
"""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import MixtralConfig, MixtralForCausalLM

from moeharden.attack.attribution import observed_scores, stats_from_record


@pytest.fixture(scope="module")
def tiny_mixtral():
    torch.manual_seed(0)
    cfg = MixtralConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, num_local_experts=6, num_experts_per_tok=2,
                        max_position_embeddings=64)
    model = MixtralForCausalLM(cfg).eval()
    with torch.no_grad():  # non-trivial routing
        for layer in model.model.layers:
            layer.mlp.gate.weight.normal_(0, 0.5)
    return model


def _reference(model, input_ids, attention_mask):
    """Per layer: frequency, gate sum, REAP, EAN and mean routing probability, from raw weights."""
    captured = {}

    def grab(i):
        def hook(module, args):
            captured[i] = args[0].detach().reshape(-1, args[0].shape[-1])   # [B*T, H] MoE-block input
        return hook

    hs = [layer.mlp.register_forward_pre_hook(grab(i)) for i, layer in enumerate(model.model.layers)]
    with torch.no_grad():
        model(input_ids=input_ids, attention_mask=attention_mask)
    for h in hs:
        h.remove()
    keep = attention_mask.reshape(-1).bool()
    out = {}
    for i, layer in enumerate(model.model.layers):
        x = captured[i][keep]                                             # [T, H]
        W = layer.mlp.gate.weight
        probs = torch.softmax(x @ W.T, -1)                                # [T, E]
        top_w, top_i = probs.topk(2, -1)
        top_w = top_w / top_w.sum(-1, keepdim=True)
        E = W.shape[0]
        freq, gate, wn, norm = (torch.zeros(E, dtype=torch.float64) for _ in range(4))
        ex = layer.mlp.experts
        for t in range(x.shape[0]):
            for s in range(2):
                e = int(top_i[t, s])
                g, u = (ex.gate_up_proj[e] @ x[t]).chunk(2)
                y = ex.down_proj[e] @ (torch.nn.functional.silu(g) * u)   # expert output before weighting
                n = float(y.norm())
                freq[e] += 1
                gate[e] += float(top_w[t, s])
                wn[e] += float(top_w[t, s]) * n
                norm[e] += n
        out[i] = {"frequency": freq, "gate": gate, "ean": norm,
                  "reap": torch.where(freq > 0, wn / freq.clamp(min=1), torch.zeros_like(freq)),
                  "soft": probs.double().mean(0)}
    return out


def test_observed_scores_match_hand_computation(tiny_mixtral):
    from moeharden.model.routing import record_routing

    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 64, (3, 7), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0          # padding must be excluded
    mask[2, 3:] = 0
    with record_routing(tiny_mixtral, norms=True, attention_mask=mask) as rec, torch.no_grad():
        tiny_mixtral(input_ids=ids, attention_mask=mask)
    st = stats_from_record(rec, [0, 1], 6)
    assert st.tokens == int(mask.sum())
    got = observed_scores(st)
    ref = _reference(tiny_mixtral, ids, mask)
    for row in (0, 1):
        for m in ("frequency", "gate", "reap", "ean", "soft"):
            torch.testing.assert_close(got[m][row], ref[row][m], rtol=1e-4, atol=1e-5, msg=f"{m} layer {row}")
    assert got["frequency"][0].sum() == 2 * int(mask.sum())


def _check_groups(lengths, batch, budget):
    from moeharden.attack.attribution import token_groups

    groups = token_groups(lengths, batch, budget)
    assert [i for g in groups for i in g] == list(range(len(lengths)))     # every row once, in order
    for g in groups:
        assert len(g) <= batch
        if budget is not None and len(g) > 1:
            assert len(g) * max(lengths[i] for i in g) <= budget       # padded tokens within the budget
    for a, b in zip(groups[:-1], groups[1:], strict=True):    # greedy: the next row did not fit into the group before it
        cand = [*a, b[0]]
        assert len(cand) > batch or (budget is not None and len(cand) * max(lengths[i] for i in cand) > budget)
    return groups


def test_token_groups_pack_rows_within_the_budget():
    assert _check_groups([4, 4, 4, 4, 4], 32, 8) == [[0, 1], [2, 3], [4]]
    assert _check_groups([3, 10, 2], 32, 8) == [[0], [1], [2]]             # a row longer than the budget: alone
    assert _check_groups([5] * 7, 3, None) == [[0, 1, 2], [3, 4, 5], [6]]  # no budget: rows only
    assert _check_groups([], 4, 16) == []
    g = torch.Generator().manual_seed(0)
    for _ in range(200):
        n = int(torch.randint(1, 40, (1,), generator=g))
        lengths = torch.randint(1, 30, (n,), generator=g).tolist()
        _check_groups(lengths, int(torch.randint(1, 9, (1,), generator=g)), int(torch.randint(1, 80, (1,), generator=g)))


def test_routing_stats_do_not_depend_on_the_token_budget():
    """The same texts in one padded batch, and packed four tokens per forward: the same summed
    statistics (padding excluded), and the token count is the texts' own."""
    from tiny_lm import build_model, build_tokenizer

    from moeharden.attack.attribution import routing_stats

    tok = build_tokenizer()
    model = build_model(tok)
    texts = ["it 's a charming journey", "positive", "the cat sat on the mat . a cat was sitting", "no", "yes no"]
    whole = routing_stats(model, tok, texts, [0, 1], 4, batch_size=32, max_tokens=None)
    packed = routing_stats(model, tok, texts, [0, 1], 4, batch_size=32, max_tokens=4)
    assert whole.tokens == packed.tokens == sum(len(tok(t)["input_ids"]) for t in texts)
    a, b = observed_scores(whole), observed_scores(packed)
    for m in a:
        torch.testing.assert_close(a[m], b[m], rtol=1e-4, atol=1e-5, msg=m)


def test_token_budget_scales_with_the_model(tiny_mixtral):
    """The automatic budget: as many tokens as keep one forward's expert activations — per token
    k · (3·I + 2·H) values (SwiGLU intermediates, input and output of each routed pair) — under the
    share of the weight bytes, floored and capped; computed here from the config alone."""
    from moeharden.attack.attribution import MAX_BATCH_TOKENS, token_budget

    cfg = tiny_mixtral.config
    per_token = cfg.num_experts_per_tok * (3 * cfg.intermediate_size + 2 * cfg.hidden_size) * 4   # float32
    weight_bytes = 4 * sum(p.numel() for p in tiny_mixtral.parameters())
    assert token_budget(tiny_mixtral) == MAX_BATCH_TOKENS                  # a tiny model: the floor
    for share in (0.5, 3.0, 40.0):
        assert token_budget(tiny_mixtral, share=share, floor=1, cap=10**9) == int(share * weight_bytes // per_token)
    assert token_budget(tiny_mixtral, share=40.0, floor=1, cap=100) == 100
    half = copy.deepcopy(tiny_mixtral).to(torch.bfloat16)                    # bytes halve on both sides
    assert token_budget(half, share=3.0, floor=1, cap=10**9) == int(3.0 * weight_bytes // per_token)


@pytest.mark.parametrize(("family", "null"), [("longcat_flash", 2), ("zaya", 1)])
def test_null_expert_picks_count_for_no_expert(family, null):
    """LongCat-Flash's router also picks weightless identity experts (ids E…E+Z-1), ZAYA's a
    no-compute skip expert (id E), and both blocks hand their experts module remapped pairs. The
    record holds the router's own choice — equal to an independent top-k of the router's scores
    plus selection bias — with a skip's weight and norm 0, and attribution counts null picks for
    no expert: the per-expert sums equal a hand count over the record's real picks only."""
    from families import build_tiny

    from moeharden.model.registry import moe_layers
    from moeharden.model.routing import record_routing

    model, _ = build_tiny(family)
    layers = moe_layers(model)
    E = layers[0].num_experts
    assert layers[0].num_null == null and layers[0].router_rows == E + null
    if family == "zaya":                   # its skip bias (-1.0) keeps a random router off the skip expert
        with torch.no_grad():
            for li in layers:
                li.selection_bias[-1] = 0.5
    logits = {}
    hooks = [li.router.register_forward_hook(lambda m, a, out, li=li: logits.__setitem__(li.layer, out[0].detach()))
             for li in layers]
    ids = torch.randint(3, 64, (4, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad(), record_routing(model, norms=True) as rec:
        model(input_ids=ids)
    for h in hooks:
        h.remove()
    for li in layers:                      # the record against the router's own scores, recomputed here
        scores = logits[li.layer].reshape(-1, E + null).float().softmax(-1)
        want = (scores + li.selection_bias.float()).topk(li.top_k, -1).indices
        r = rec.layers[li.layer]
        assert [set(x) for x in r.indices.tolist()] == [set(x) for x in want.tolist()]
        skip = r.indices >= E
        if family == "zaya":
            assert (r.weights[skip] == 0).all() and (r.norms[skip] == 0).all()
    st = stats_from_record(rec, [li.layer for li in layers], E)
    null_picks = 0
    for row, li in enumerate(layers):
        r = rec.layers[li.layer]
        count, gate, wnorm = [0.0] * E, [0.0] * E, [0.0] * E
        for e, w, n in zip(r.indices.reshape(-1).tolist(), r.weights.reshape(-1).tolist(),
                           r.norms.reshape(-1).tolist(), strict=True):
            if e >= E:
                null_picks += 1
                continue
            count[e] += 1
            gate[e] += w
            wnorm[e] += w * n
        assert st.count[row].tolist() == count
        assert st.gate[row].tolist() == pytest.approx(gate)
        assert st.weighted_norm[row].tolist() == pytest.approx(wnorm)
        assert r.probs.shape[1] == E                          # the routed experts' scores only
    assert null_picks > 0, "the tiny router should pick its null experts on some tokens"
