"""Attribution scores against an independent hand computation on a tiny real Mixtral.

The reference walks the model layer by layer with the raw weights: it recomputes each layer's
routing (softmax over router logits, top-2, renormalised) and each chosen expert's SwiGLU output
from ``gate_up_proj``/``down_proj``, then forms frequency / gate / REAP / EAN / soft by hand.
"""

from __future__ import annotations

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
