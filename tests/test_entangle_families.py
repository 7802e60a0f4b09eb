"""Entangled training on every supported family: it runs, its load-balance term is computed from the
logits each router returns, and every pruned sub-model it trains against is one the family's
routing can run with (routing groups, minimum kept experts).

The tasks are the demo's own (its tokenizer has 70 tokens, so each tiny model is built with that
vocabulary); a step is short (one task, one keep-set, no simulated recovery) — what is checked is that the
objective is well formed for the family, not what it achieves.
"""

from __future__ import annotations

import random

import pytest
import torch
from families import FAMILIES, build_tiny

from moeharden.defend.entangle.loop import entangle_model
from moeharden.defend.entangle.losses import RouterTap, partition_routing, spread_loss
from moeharden.defend.entangle.pools import refresh_pools, sample_keepset, train_keeps
from moeharden.defend.entangle.recipe import EntangleRecipe
from moeharden.model.keepset import check_keep_counts, valid_keep
from moeharden.model.registry import moe_layers, routing_groups
from moeharden.tasks.encoding import encode

VOCAB = 70


@pytest.fixture(scope="module")
def demo_tasks(tmp_path_factory):
    from moeharden.demo import build as demo
    from moeharden.model.checkpoint import load_tokenizer
    from moeharden.tasks.resolve import load_tasks

    path = demo.build_demo_model(tmp_path_factory.mktemp("demo") / "model", steps=30)
    return load_tokenizer(path), load_tasks(None, checkpoint_dir=path, limit=8)


@pytest.mark.parametrize("family", FAMILIES)
def test_entangle_step_runs_on_every_family(family, demo_tasks):
    tok, tasks = demo_tasks
    model, _ = build_tiny(family, vocab_size=VOCAB)
    routers = [li.router_weight for li in moe_layers(model)]
    before = [w.detach().clone() for w in routers]
    recipe = EntangleRecipe(steps=1, batch_size=4, recompute_every=1, adversarial_swaps=1, subsets_per_step=1,
                            lr=1e-3, recovery_term=False)
    hist, done = entangle_model(model.train(), tok, tasks[:1], recipe, ckpt_dir=None)   # one task: Kimi-Linear's
    # and Bailing's linear attention run a pure-PyTorch fallback on CPU (~4 s a forward of 4 rows)
    assert done == 1
    assert all(torch.isfinite(torch.tensor(v)) for k, v in hist[-1].items() if k != "step"), hist[-1]
    assert routers and all(not torch.equal(w.detach(), b) for w, b in zip(routers, before, strict=True))


NULL_AND_ODD_ROUTERS = ["mixtral", "longcat_flash", "zaya", "inkling_text", "gemma4_text", "deepseek_v3"]


@pytest.mark.parametrize("family", NULL_AND_ODD_ROUTERS)
def test_spread_and_partition_use_the_routers_own_logits(family, demo_tasks):
    """The spread and partition terms equal a plain-loop computation from the logits each router
    returned (its routed experts' columns only: LongCat-Flash's zero experts, ZAYA's skip class and
    Inkling's shared-expert gates left out), and their gradient reaches every router — also ZAYA's,
    which scores through an MLP, and Gemma-4's, which normalises its input first (a projection
    recomputed from the router's input is not what either routes by)."""
    tok, tasks = demo_tasks
    model, _ = build_tiny(family, vocab_size=VOCAB)
    layers = moe_layers(model)
    batch = encode(tok, tasks[0].train[:4])
    seen = []
    hooks = [li.router.register_forward_hook(lambda m, a, out, li=li: seen.append((out, li))) for li in layers]
    with RouterTap(layers) as tap:
        model(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
    for h in hooks:
        h.remove()
    spread = spread_loss(tap.logits, batch.attention_mask)
    part = partition_routing(tap.logits, batch.input_ids, batch.attention_mask, seed=1)
    mask = batch.attention_mask.reshape(-1).tolist()
    want = 0.0
    for out, li in seen:
        logits = out[li.spec.logits_at] if isinstance(out, tuple) else out
        rows = [r for r, m in zip(logits.detach().reshape(len(mask), -1).double(), mask, strict=True) if m]
        E = li.num_experts
        pbar = [0.0] * E
        for row in rows:
            x = row[:E] if li.spec.score != "probs" else row[:E].clamp_min(1e-30).log()
            p = torch.softmax(x, 0)
            for e in range(E):
                pbar[e] += float(p[e]) / len(rows)
        want += E * sum(v * v for v in pbar) - 1.0
    assert float(spread.detach()) == pytest.approx(want, rel=1e-4, abs=1e-6)
    (spread + part).backward()
    for li in layers:
        g = li.router_weight.grad
        assert g is not None and float(g.abs().sum()) > 0, li.layer


@pytest.mark.parametrize("family", ["deepseek_v3", "glm4_moe", "phimoe"])
def test_every_trained_keep_set_is_one_the_routing_can_run_with(family, demo_tasks):
    """Group-limited routing (DeepSeek-V3 and GLM4-MoE score each group by its top 2) and Phi-MoE
    (always picks 2) cannot run with every keep-set: the training keep-counts, the attribution and
    adversarial pools and the random draws all take the same count from every routing group, at
    least the family's minimum (before, entangle on these families stopped at its first pruned
    sub-model with a keep-set error)."""
    tok, tasks = demo_tasks
    model, cfg = build_tiny(family, vocab_size=VOCAB)
    layers = moe_layers(model)
    spec, E, G = layers[0].spec, layers[0].num_experts, routing_groups(layers[0].spec, cfg)
    recipe = EntangleRecipe(batch_size=4, adversarial_swaps=4)
    keeps = train_keeps(E, recipe.keep_ratios, lambda k: valid_keep(spec, cfg, k))
    assert keeps and all(valid_keep(spec, cfg, k) for k in keeps)
    assert keeps != train_keeps(E, recipe.keep_ratios)          # some ratios give counts it cannot run with
    rng = random.Random(0)
    ids = [li.layer for li in layers]
    attr, adv = refresh_pools(model, tok, tasks, ids, E, keeps, recipe, rng, "cpu", G)
    drawn = [sample_keepset(rng, recipe, attr[t.name], adv[t.name], ids, E, keeps, G)[1]
             for t in tasks for _ in range(30)]
    every = [ks for t in tasks for ks in attr[t.name] + adv[t.name]] + drawn
    assert len(every) > 90
    for ks in every:
        check_keep_counts(spec, cfg, ks, balanced=True)          # raises KeepSetError otherwise
        assert len(next(iter(ks.values()))) in keeps
