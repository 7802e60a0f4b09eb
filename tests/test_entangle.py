"""Entangled training: a resumed run gives the same weights as an uninterrupted one; recipes validate."""

from __future__ import annotations

import pytest
import torch

from moeharden.defend.entangle.loop import entangle_model
from moeharden.defend.entangle.losses import pruned_hinge
from moeharden.defend.entangle.recipe import EntangleRecipe, load_recipe
from moeharden.demo import build as demo


@pytest.fixture(scope="module")
def tiny_demo_path(tmp_path_factory):
    return demo.build_demo_model(tmp_path_factory.mktemp("demo") / "model", steps=30)


def _load(path):
    from moeharden.model.checkpoint import load_model, load_tokenizer
    from moeharden.tasks.resolve import load_tasks

    return load_model(path), load_tokenizer(path), load_tasks(None, checkpoint_dir=path, limit=32)


@pytest.mark.parametrize("recovery", [False, True])
def test_resume_gives_the_same_weights(tiny_demo_path, tmp_path, recovery):
    recipe = EntangleRecipe(steps=6, batch_size=8, recompute_every=3, adversarial_swaps=2, checkpoint_every=2,
                            subsets_per_step=1, lr=1e-3, recovery_term=recovery, recovery_steps=2,
                            recovery_update="sign", recovery_inner=("labels", "distill"), recovery_every=2)
    model_a, tok, tasks = _load(tiny_demo_path)
    entangle_model(model_a, tok, tasks, recipe, ckpt_dir=tmp_path / "a")
    model_b, _, _ = _load(tiny_demo_path)
    hist, done = entangle_model(model_b, tok, tasks, recipe, ckpt_dir=tmp_path / "b", stop_after=3)
    assert done == 3 and len(hist) == 3
    model_c, _, _ = _load(tiny_demo_path)                 # a fresh process would start from the original
    hist, done = entangle_model(model_c, tok, tasks, recipe, ckpt_dir=tmp_path / "b", resume=True)
    assert done == 6 and [h["step"] for h in hist] == [1, 2, 3, 4, 5, 6]
    a = dict(model_a.named_parameters())
    moved = False
    for n, p in model_c.named_parameters():
        torch.testing.assert_close(p, a[n], rtol=0, atol=1e-6)
    orig, _, _ = _load(tiny_demo_path)
    for n, p in orig.named_parameters():
        moved |= not torch.equal(p, a[n])
    assert moved, "training changed nothing"


@pytest.mark.parametrize("presses", [1, 2])
def test_a_ctrl_c_checkpoints_the_step_in_progress_and_a_second_stops_at_once(tiny_demo_path, tmp_path, presses):
    """One Ctrl-C at step 3 (checkpoints every 2): step 3 ends and is checkpointed, and the resumed
    run gives the uninterrupted run's weights; two presses stop at once (the checkpoint of step 2)."""
    import json
    import os
    import signal

    from moeharden.defend.entangle.resume import checkpoint_run

    recipe = EntangleRecipe(steps=6, batch_size=8, recompute_every=3, adversarial_swaps=2, checkpoint_every=2,
                            subsets_per_step=1, lr=1e-3)
    model_a, tok, tasks = _load(tiny_demo_path)
    entangle_model(model_a, tok, tasks, recipe)
    steps = []

    def press(_n, **_logs):
        steps.append(len(steps) + 1)
        if len(steps) == 3:
            for _ in range(presses):
                os.kill(os.getpid(), signal.SIGINT)
            steps.append("after the presses")             # reached only when the Ctrl-C was held

    model_b, _, _ = _load(tiny_demo_path)
    before = signal.getsignal(signal.SIGINT)
    with pytest.raises(KeyboardInterrupt):
        entangle_model(model_b, tok, tasks, recipe, ckpt_dir=tmp_path / "b", progress=press)
    assert signal.getsignal(signal.SIGINT) is before      # the handler is given back
    state = json.loads((tmp_path / "b" / "latest" / "state.json").read_text())
    assert state["step"] == (3 if presses == 1 else 2) and checkpoint_run(tmp_path / "b" / "latest")
    assert ("after the presses" in steps) == (presses == 1)
    model_c, _, _ = _load(tiny_demo_path)
    hist, done = entangle_model(model_c, tok, tasks, recipe, ckpt_dir=tmp_path / "b", resume=True)
    assert done == 6 and [h["step"] for h in hist] == [1, 2, 3, 4, 5, 6]
    a = dict(model_a.named_parameters())
    for n, p in model_c.named_parameters():
        torch.testing.assert_close(p, a[n], rtol=0, atol=1e-6)


def test_a_checkpoint_is_resumed_only_by_the_run_that_wrote_it(tiny_demo_path, tmp_path):
    from moeharden.errors import UsageError

    recipe = EntangleRecipe(steps=4, batch_size=8, recompute_every=2, adversarial_swaps=1, checkpoint_every=1,
                            subsets_per_step=1, lr=1e-3)
    model, tok, tasks = _load(tiny_demo_path)
    _, done = entangle_model(model, tok, tasks, recipe, ckpt_dir=tmp_path / "c", stop_after=2)
    assert done == 2
    model, _, _ = _load(tiny_demo_path)         # the same run again: it picks up at step 2
    hist, done = entangle_model(model, tok, tasks, recipe, ckpt_dir=tmp_path / "c", resume_if_same=True, stop_after=3)
    assert done == 3 and [h["step"] for h in hist] == [1, 2, 3]
    other = recipe.model_copy(update={"lr": 2e-3})
    model, _, _ = _load(tiny_demo_path)         # another recipe: starts again, and --resume is refused
    hist, done = entangle_model(model, tok, tasks, other, ckpt_dir=tmp_path / "d", stop_after=1)
    model, _, _ = _load(tiny_demo_path)
    with pytest.raises(UsageError, match="another run"):
        entangle_model(model, tok, tasks, recipe, ckpt_dir=tmp_path / "d", resume=True)
    hist, done = entangle_model(model, tok, tasks, recipe, ckpt_dir=tmp_path / "d", resume_if_same=True, stop_after=2)
    assert done == 2 and [h["step"] for h in hist] == [1, 2]
    model, _, _ = _load(tiny_demo_path)         # other starting weights: starts again
    with torch.no_grad():
        next(model.parameters()).add_(1e-3)
    hist, done = entangle_model(model, tok, tasks, recipe, ckpt_dir=tmp_path / "c", resume_if_same=True, stop_after=1)
    assert [h["step"] for h in hist] == [1]


def test_pruned_term_is_bounded():
    from moeharden.tasks.encoding import LMBatch

    recipe = EntangleRecipe()
    labels = torch.tensor([[-100, 5, 6]])
    batch = LMBatch(torch.zeros(1, 3, dtype=torch.long), torch.ones(1, 3, dtype=torch.long), labels)
    confident_wrong = torch.full((1, 3, 10), -20.0)
    confident_wrong[..., 0] = 20.0                       # always predicts token 0: CE is huge
    assert float(pruned_hinge(confident_wrong, batch, recipe)) == 0.0   # already past tau: no push
    right = torch.full((1, 3, 10), -20.0)
    right[0, 0, 5] = right[0, 1, 6] = 20.0               # predicts the answer: pushed by at most tau
    assert 0 < float(pruned_hinge(right, batch, recipe)) <= recipe.tau_token
    # multiple choice: zero at uniform over the choices, at most ln C otherwise
    mc = LMBatch(batch.input_ids, batch.attention_mask, labels, torch.tensor([[5, 7]]), torch.tensor([0]))
    uniform = torch.zeros(1, 3, 10)
    assert float(pruned_hinge(uniform, mc, recipe)) == pytest.approx(0.0, abs=1e-6)
    assert float(pruned_hinge(right, mc, recipe)) <= torch.log(torch.tensor(2.0)) + 1e-6


def test_recipe_precedence_and_errors(tmp_path):
    from moeharden.errors import ConfigFileError

    p = tmp_path / "r.yaml"
    p.write_text("version: 1\nsteps: 50\nlambda_prune: 0.0\n")
    r = load_recipe(p, steps=None, lambda_prune=None, lr=0.5)
    assert r.steps == 50 and r.lambda_prune == 0.0 and r.lr == 0.5     # None never overrides; 0.0 stands
    p.write_text("version: 1\nsteps: -1\nbogus: 3\nlr: x\n")
    with pytest.raises(ConfigFileError) as err:
        load_recipe(p)
    msg = str(err.value)
    assert "steps" in msg and "bogus" in msg and "lr" in msg            # all problems at once


@pytest.mark.parametrize("update,inner", [("sgd", "labels"), ("sign", "distill")])
def test_recovery_term_matches_an_independent_computation(tiny_demo_path, update, inner):
    """The TAR-style term adds ∇ℓ at θ' = θ − α·u(∇ attacker loss) to the gradient and restores θ."""
    import copy

    import torch.nn.functional as F
    from accelerate import Accelerator

    from moeharden.defend.entangle.losses import kl_retain, simulated_recovery
    from moeharden.model.masking import mask_experts
    from moeharden.model.registry import moe_layers
    from moeharden.tasks.encoding import answer_logits, encode

    model, tok, tasks = _load(tiny_demo_path)
    task = next(t for t in tasks if t.name == "sentiment")
    batch, held = encode(tok, task.train[:8]), encode(tok, task.train[8:16])
    keep = {li.layer: [0, 3] for li in moe_layers(model)}
    recipe = EntangleRecipe(recovery_term=True, recovery_steps=1, recovery_update=update, recovery_lr=0.01,
                            lambda_recovery=1.0)
    with torch.no_grad():
        full = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    ref = copy.deepcopy(model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = torch.ones_like(p)                      # gradients already accumulated are kept
    value = simulated_recovery(model, model, batch, held, keep, recipe, Accelerator(cpu=True), 1, inner, full)
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), f"{n} not restored"

    # independent computation on a copy: one attacker step by hand, then the bounded term's gradient
    params = list(ref.parameters())
    with mask_experts(ref, keep):
        logits = ref(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        if inner == "distill":
            atk = kl_retain(logits, full, batch.attention_mask)
        else:
            al, at = answer_logits(logits, batch.labels)
            atk = F.cross_entropy(al.float(), at)
    grads = torch.autograd.grad(atk, params, allow_unused=True)
    with torch.no_grad():
        for p, g in zip(params, grads, strict=True):
            if g is not None:
                p -= 0.01 * (g.sign() if update == "sign" else g)
    with mask_experts(ref, keep):
        lp = pruned_hinge(ref(input_ids=held.input_ids, attention_mask=held.attention_mask).logits, held, recipe)
    lp.backward()
    assert value == pytest.approx(float(lp.detach()), rel=1e-5)
    nonzero = 0
    for (n, p), q in zip(model.named_parameters(), params, strict=True):
        expect = 1.0 + (q.grad if q.grad is not None else torch.zeros_like(p))
        torch.testing.assert_close(p.grad, expect, rtol=1e-4, atol=1e-6, msg=n)
        nonzero += int(q.grad is not None and bool(q.grad.abs().sum() > 0))
    assert nonzero > 0


def test_divergence_term_matches_an_independent_computation(tiny_demo_path):
    """The block outputs BlockTap captures equal the routed experts' weighted sum computed by hand, a
    token whose routed experts are all kept has zero divergence in the first MoE layer, and the
    term is relu(ρ − d) averaged — bounded by ρ, 0 once the pruned outputs are far enough away."""
    import torch.nn.functional as F

    from moeharden.defend.entangle.losses import BlockTap, pruned_divergence
    from moeharden.model.masking import mask_experts
    from moeharden.model.registry import moe_layers
    from moeharden.tasks.encoding import encode

    model, tok, tasks = _load(tiny_demo_path)
    batch = encode(tok, [ex for t in tasks for ex in t.train[:4]])   # every task: tokens on different experts
    info = moe_layers(model)
    li = info[0]
    captured = {}
    def grab(module, args, kwargs):
        captured.setdefault("x", args[0] if args else kwargs["hidden_states"])

    h = li.block.register_forward_pre_hook(grab, with_kwargs=True)
    with torch.no_grad(), BlockTap(info) as full:
        model(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
    h.remove()
    # independent: Mixtral's block = Σ over the top-2 of softmax(router) renormalised, of each expert's SwiGLU
    x = captured["x"].reshape(-1, captured["x"].shape[-1])
    probs = torch.softmax(F.linear(x, li.router_weight).float(), -1)
    w, idx = probs.topk(li.top_k, -1)
    w = w / w.sum(-1, keepdim=True)
    ex = li.experts
    by_hand = torch.zeros_like(x)
    for e in range(li.num_experts):
        gate, up = F.linear(x, ex.gate_up_proj[e]).chunk(2, -1)
        y = F.linear(F.silu(gate) * up, ex.down_proj[e])
        by_hand += (w * (idx == e)).sum(-1, keepdim=True) * y
    torch.testing.assert_close(full.outputs[0].reshape(by_hand.shape), by_hand, rtol=1e-4, atol=1e-5)
    # keep 4 experts: the first token's pair and two others, never one expert of a token routed elsewhere
    pair0 = set(idx[0].tolist())
    other = next(set(r.tolist()) - pair0 for r in idx if set(r.tolist()) - pair0)
    kept = sorted(pair0 | set([e for e in range(li.num_experts) if e not in pair0 | other][:2]))
    keep = {x.layer: kept for x in info}
    with torch.no_grad(), mask_experts(model, keep), BlockTap(info) as pruned:
        model(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
    kept_pair = torch.isin(idx, torch.tensor(kept)).all(-1)
    d0 = ((pruned.outputs[0] - full.outputs[0]) ** 2).sum(-1).reshape(-1)
    assert kept_pair.any() and (~kept_pair).any()
    assert float(d0[kept_pair].max()) < 1e-10 and float(d0[~kept_pair].min()) > 0
    ratio = 2.0
    m = batch.attention_mask.reshape(-1).bool()
    expect = 0.0
    for ys, yf in zip(pruned.outputs, full.outputs, strict=True):
        ys, yf = ys.reshape(-1, ys.shape[-1])[m], yf.reshape(-1, yf.shape[-1])[m]
        d = ((ys - yf) ** 2).sum(-1) / (yf ** 2).sum(-1).mean()
        expect += float(torch.clamp(ratio - d, min=0).mean()) / len(info)
    value = float(pruned_divergence(pruned.outputs, full.outputs, batch.attention_mask, ratio))
    assert value == pytest.approx(expect, rel=1e-5) and 0 < value <= ratio
    far = [y * 0 + 100.0 for y in pruned.outputs]
    assert float(pruned_divergence(far, full.outputs, batch.attention_mask, ratio)) == 0.0


def test_scratch_init_trains_fresh_weights_against_the_original(tiny_demo_path):
    """``init: scratch``: the student starts from the class's own initialiser under the seed (what
    ``from_config`` builds), the KL teacher stays the original; ``polish_steps`` skips the pruned
    terms in the last steps (their losses log 0)."""
    from moeharden.attack.references import fresh_model

    model, tok, tasks = _load(tiny_demo_path)
    want = {n: p.detach().clone() for n, p in fresh_model(model, 5).named_parameters()}
    orig = {n: p.detach().clone() for n, p in model.named_parameters()}
    recipe = EntangleRecipe(steps=2, batch_size=4, lr=1e-12, init="scratch", seed=5, subsets_per_step=1,
                            adversarial_swaps=1, polish_steps=1, lambda_diverge=1.0)
    hist, _ = entangle_model(model, tok, tasks, recipe)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), want[n], rtol=0, atol=1e-6, msg=n)
    assert any(not torch.equal(want[n], orig[n]) for n in want)
    assert hist[0]["retain"] > 0.1                         # a fresh student is far from the original teacher
    assert hist[0]["prune"] > 0 and hist[1]["prune"] == 0.0 and hist[1]["diverge"] == 0.0


def test_frozen_experts_stay_the_fresh_draw_and_the_rest_trains(tiny_demo_path):
    """``expert_lr_scale: 0`` with ``init: scratch``: the routed experts end bit for bit as the
    class's initialiser drew them under the seed (an independent ``from_config``); the router, the
    attention and the embeddings move."""
    from moeharden.attack.references import fresh_model
    from moeharden.model.registry import parameter_groups

    model, tok, tasks = _load(tiny_demo_path)
    want = {n: p.detach().clone() for n, p in fresh_model(model, 3).named_parameters()}
    groups = parameter_groups(None, model)
    recipe = EntangleRecipe(steps=3, batch_size=4, lr=1e-2, init="scratch", seed=3, subsets_per_step=1,
                            adversarial_swaps=1, expert_lr_scale=0.0)
    entangle_model(model, tok, tasks, recipe)
    got = dict(model.named_parameters())
    assert groups["experts"] and all(torch.equal(got[n], want[n]) for n in groups["experts"])
    for g in ("router", "attention", "embeddings"):
        assert any(not torch.equal(got[n], want[n]) for n in groups[g]), g


def test_cancellation_term_matches_an_independent_computation(tiny_demo_path):
    """Each routed slot's expert alone (weight 1) equals that expert's SwiGLU computed by hand, the
    block's experts output is their weighted sum, and the term is mean relu(ρ − ‖E_s − y‖²/mean‖y‖²)."""
    import torch.nn.functional as F

    from moeharden.defend.entangle.losses import ExpertsTap, pair_cancellation
    from moeharden.model.registry import moe_layers
    from moeharden.tasks.encoding import encode

    model, tok, tasks = _load(tiny_demo_path)
    batch = encode(tok, tasks[1].train[:4])
    info = moe_layers(model)
    with torch.no_grad(), ExpertsTap(info) as tap:
        model(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
    assert len(tap.taps) == len(info)
    ratio, expect = 3.0, []
    m = batch.attention_mask.reshape(-1).bool()
    for li, (_, (hidden, idx, w), y) in zip(info, tap.taps, strict=True):
        ex = li.experts
        per_slot = []
        for s in range(idx.shape[1]):
            out = torch.zeros_like(hidden)
            for e in range(li.num_experts):
                rows = idx[:, s] == e
                gate, up = F.linear(hidden[rows], ex.gate_up_proj[e]).chunk(2, -1)
                out[rows] = F.linear(F.silu(gate) * up, ex.down_proj[e])
            per_slot.append(out)
        torch.testing.assert_close(sum(w[:, s:s + 1] * per_slot[s] for s in range(len(per_slot))), y,
                                   rtol=1e-4, atol=1e-5)
        scale = (y[m] ** 2).sum(-1).mean()
        expect += [float(torch.clamp(ratio - ((es[m] - y[m]) ** 2).sum(-1) / scale, min=0).mean()) for es in per_slot]
    with torch.no_grad():
        value = float(pair_cancellation(tap.taps, batch.attention_mask, ratio))
    assert value == pytest.approx(sum(expect) / len(expect), rel=1e-5) and 0 < value <= ratio


def test_partition_targets_are_distinct_deterministic_and_keyed():
    from moeharden.defend.entangle.losses import partition_targets

    ids = torch.arange(500)
    t = partition_targets(ids, layer=1, num_experts=8, k=2, seed=0)
    assert t.shape == (500, 2) and bool((t[:, 0] != t[:, 1]).all()) and int(t.min()) >= 0 and int(t.max()) < 8
    assert torch.equal(t, partition_targets(ids.clone(), 1, 8, 2, 0))           # same key, same partition
    assert not torch.equal(t, partition_targets(ids, 1, 8, 2, 1))               # another seed, another one
    assert not torch.equal(t, partition_targets(ids, 2, 8, 2, 0))               # per layer
    first = torch.bincount(t.reshape(-1), minlength=8).float() / t.numel()
    assert float(first.min()) > 0.08 and float(first.max()) < 0.17             # every expert gets a share


def test_partition_routing_matches_an_independent_computation(tiny_demo_path):
    """−(1/k) Σ_j log softmax(router logits)[target_j], averaged over non-pad tokens and layers,
    computed from the routers' own outputs (their logits) in a plain loop."""
    from moeharden.defend.entangle.losses import RouterTap, partition_routing, partition_targets
    from moeharden.model.registry import moe_layers
    from moeharden.tasks.encoding import encode

    model, tok, tasks = _load(tiny_demo_path)
    batch = encode(tok, tasks[0].train[:5])
    info = moe_layers(model)
    logits_seen = []
    hooks = [li.router.register_forward_hook(lambda m, a, out: logits_seen.append(out)) for li in info]
    with torch.no_grad(), RouterTap(info) as tap:
        model(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
    for h in hooks:
        h.remove()
    with torch.no_grad():
        value = float(partition_routing(tap.logits, batch.input_ids, batch.attention_mask, seed=3))
    per_layer = []
    for li, out in zip(info, logits_seen, strict=True):
        logits = out[0] if isinstance(out, tuple) else out
        logits = logits.reshape(-1, li.num_experts)                     # the router's own logits [B·T, E]
        terms = []
        for b in range(batch.input_ids.shape[0]):
            for t in range(batch.input_ids.shape[1]):
                if not batch.attention_mask[b, t]:
                    continue
                row = logits[b * batch.input_ids.shape[1] + t].double()
                lp = row - torch.logsumexp(row, 0)
                tgt = partition_targets(batch.input_ids[b, t:t + 1], li.layer, li.num_experts, li.top_k, 3)[0]
                terms.append(-sum(float(lp[e]) for e in tgt) / li.top_k)
        per_layer.append(sum(terms) / len(terms))
    assert value == pytest.approx(sum(per_layer) / len(per_layer), rel=1e-5)
    assert value >= torch.log(torch.tensor(float(info[0].top_k))).item() - 1e-6


def test_partition_term_moves_routing_onto_the_partition(tiny_demo_path):
    """A short entangle run with only the partition term switched on makes every router send more
    tokens to their assigned experts than the original routing does."""
    from moeharden.defend.entangle.losses import partition_targets
    from moeharden.model.registry import moe_layers
    from moeharden.tasks.encoding import encode

    def agreement(model, batch):
        info = moe_layers(model)
        outs = []
        hooks = [li.router.register_forward_hook(lambda m, a, out: outs.append(out)) for li in info]
        with torch.no_grad():
            model(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
        for h in hooks:
            h.remove()
        m = batch.attention_mask.reshape(-1).bool()
        ids = batch.input_ids.reshape(-1)[m]
        hits = []
        for li, out in zip(info, outs, strict=True):
            logits = (out[0] if isinstance(out, tuple) else out).reshape(-1, li.num_experts)[m]
            chosen = logits.topk(li.top_k, -1).indices.sort(-1).values
            want = partition_targets(ids, li.layer, li.num_experts, li.top_k, 0).sort(-1).values
            hits.append(float((chosen == want).all(-1).float().mean()))
        return sum(hits) / len(hits)

    model, tok, tasks = _load(tiny_demo_path)
    batch = encode(tok, [ex for t in tasks for ex in t.train[:8]])
    before = agreement(model, batch)
    recipe = EntangleRecipe(steps=40, batch_size=8, lr=3e-3, lambda_task=0.0, lambda_retain=0.0, lambda_prune=0.0,
                            lambda_spread=0.0, lambda_partition=1.0, recompute_every=100, adversarial_swaps=1,
                            subsets_per_step=1)
    hist, _ = entangle_model(model, tok, tasks, recipe)
    after = agreement(model, batch)
    assert hist[-1]["partition"] < hist[0]["partition"]
    assert after > max(0.5, before + 0.3), (before, after)
