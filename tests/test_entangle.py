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
    from moeharden.model.registry import moe_layers
    from moeharden.model.routing import mask_experts
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
