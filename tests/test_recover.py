"""The re-alignment attack: label budget, seeded selection, router-only mode, label-free distill."""

from __future__ import annotations

import pytest
import torch

from moeharden.attack.realign.run import RecoverySettings, run_recovery
from moeharden.attack.realign.selection import select
from moeharden.attack.realign.taskops import task_ops
from moeharden.demo import build as demo
from moeharden.model.masking import mask_experts
from moeharden.model.registry import moe_layers


@pytest.fixture(scope="module")
def tiny_demo(tmp_path_factory):
    """A demo-format checkpoint trained for a few steps (fast), loaded with its tasks."""
    from moeharden.model.checkpoint import load_model, load_tokenizer
    from moeharden.tasks.resolve import load_tasks

    d = tmp_path_factory.mktemp("demo")
    path = demo.build_demo_model(d / "model", steps=30)
    model, tok = load_model(path), load_tokenizer(path)
    tasks = {t.name: t for t in load_tasks(None, checkpoint_dir=path, limit=64)}
    return model, tok, tasks


class CountingOps:
    """Wraps task ops and counts every distinct example whose label the loss reads."""

    def __init__(self, ops):
        self.ops, self.seen = ops, set()

    def __getattr__(self, name):
        return getattr(self.ops, name)

    def loss(self, model, examples):
        self.seen.update(id(ex) for ex in examples)
        return self.ops.loss(model, examples)


@pytest.mark.parametrize("strategy", ["random", "entropy", "margin", "kcenter"])
def test_label_budget_is_never_exceeded(tiny_demo, strategy):
    model, tok, tasks = tiny_demo
    task = tasks["sentiment"]
    ops = CountingOps(task_ops(tok, task))
    keep = {li.layer: [0, 1] for li in moe_layers(model)}
    s = RecoverySettings(mode="router", strategy=strategy, budget=10, rounds=3, steps_per_round=2, batch_size=4)
    run = run_recovery(model, ops, task.train, s, router_params=[li.router_weight for li in moe_layers(model)],
                       mask=lambda: mask_experts(model, keep))
    assert len(ops.seen) <= 10                      # labels actually read by the loss
    assert run.labels_used == len(set(run.selected)) == 10
    assert [p[0] for p in run.points] == [0, 4, 7, 10]


def test_fixed_seed_reproduces_the_selection(tiny_demo):
    model, tok, tasks = tiny_demo
    task = tasks["addition"]
    ops = task_ops(tok, task)
    import random

    picks = [select("entropy", model, ops, task.train, [], 6, random.Random(3)) for _ in range(2)]
    assert picks[0] == picks[1]
    picks = [select("kcenter", model, ops, task.train, [], 6, random.Random(5)) for _ in range(2)]
    assert picks[0] == picks[1]
    assert select("random", model, ops, task.train, [], 6, random.Random(1)) != \
        select("random", model, ops, task.train, [], 6, random.Random(2))


def test_router_mode_changes_router_parameters_only(tiny_demo):
    model, tok, tasks = tiny_demo
    task = tasks["reverse"]
    layers = moe_layers(model)
    router = {id(li.router_weight) for li in layers}
    keep = {li.layer: [2, 3] for li in layers}
    seen_during = {}

    class Spy(CountingOps):
        def metric(self, m):                         # called inside the run, after training rounds
            seen_during.update({n: p.detach().clone() for n, p in m.named_parameters()})
            return self.ops.metric(m)

    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    s = RecoverySettings(mode="router", strategy="random", budget=8, rounds=2, steps_per_round=5, lr=1e-2)
    run_recovery(model, Spy(task_ops(tok, task)), task.train, s,
                 router_params=[li.router_weight for li in layers], mask=lambda: mask_experts(model, keep))
    changed = {n for n, p in model.named_parameters() if not torch.equal(seen_during[n], before[n])}
    assert changed, "router training changed nothing"
    names = {n for n, p in model.named_parameters() if id(p) in router}
    assert changed <= names                          # router weights only
    for n, p in model.named_parameters():            # and the model is restored afterwards
        assert torch.equal(p, before[n])


def test_distill_uses_no_labels(tiny_demo):
    model, tok, tasks = tiny_demo
    task = tasks["sentiment"]
    ops = CountingOps(task_ops(tok, task))
    keep = {li.layer: [0, 5] for li in moe_layers(model)}
    s = RecoverySettings(mode="distill", budget=8, rounds=2, steps_per_round=2, batch_size=4)
    run = run_recovery(model, ops, task.train, s, mask=lambda: mask_experts(model, keep))
    assert ops.seen == set()                          # the label-reading loss was never called
    assert run.labels_used == 0
    assert len(run.points) == 3


def test_lora_mode_trains_adapters_and_unloads_them(tiny_demo):
    model, tok, tasks = tiny_demo
    task = tasks["sentiment"]
    layers = moe_layers(model)
    experts_cls = type(layers[0].experts)
    keep = {li.layer: [0, 1] for li in layers}
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trained = {}

    class Spy(CountingOps):
        def metric(self, m):
            trained.update({n: p.detach().clone() for n, p in m.named_parameters() if "lora_" in n})
            return self.ops.metric(m)

    from moeharden.model.registry import lora_targets

    s = RecoverySettings(mode="lora", strategy="random", budget=8, rounds=2, steps_per_round=3, lr=1e-2)
    run_recovery(model, Spy(task_ops(tok, task)), task.train, s, mask=lambda: mask_experts(model, keep),
                 lora_targets=lora_targets(layers))
    assert any(".experts." in n for n in trained), "LoRA should also adapt the fused expert tensors"
    assert any("q_proj" in n for n in trained)
    assert type(moe_layers(model)[0].experts) is experts_cls            # adapters unloaded
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n])                                 # base weights untouched


def test_prune_recover_writes_a_realigned_loadable_checkpoint(tmp_path):
    import json

    from transformers import AutoModelForCausalLM
    from typer.testing import CliRunner

    from moeharden.cli import app

    path = demo.build_demo_model(tmp_path / "model", steps=30)
    keep = {"keep": {str(i): [0, 1] for i in range(3)}}
    (tmp_path / "keep.json").write_text(json.dumps(keep))
    runner = CliRunner()
    res = runner.invoke(app, ["prune", str(path), "--experts-from", str(tmp_path / "keep.json"), "--out",
                              str(tmp_path / "plain")])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["prune", str(path), "--experts-from", str(tmp_path / "keep.json"), "--out",
                              str(tmp_path / "rec"), "--recover", "--task", "sentiment", "--recover-budget", "8",
                              "--recover-mode", "full", "--recover-strategy", "margin"])
    assert res.exit_code == 0, res.output
    record = json.loads((tmp_path / "rec" / "moeharden-prune.json").read_text())
    assert record["recovery"]["labels_used"] == 8 and record["keep"] == keep["keep"]
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "plain")
    rec = AutoModelForCausalLM.from_pretrained(tmp_path / "rec")
    assert rec.config.num_local_experts == 2
    diffs = [not torch.equal(a, b) for a, b in zip(plain.parameters(), rec.parameters(), strict=True)]
    assert any(diffs)                                             # the re-aligned weights were saved


def test_lora_mode_on_dbrx_adapts_its_fused_attention_and_restores_the_model():
    """DBRX names its attention projections Wqkv/out_proj: LoRA mode must find them via the registry."""
    from families import build_tiny

    model, _ = build_tiny("dbrx")
    keep = {li.layer: [0, 1, 2, 3] for li in moe_layers(model)}
    gen = torch.Generator().manual_seed(0)
    pool = [torch.randint(0, 64, (8,), generator=gen) for _ in range(12)]
    trained = {}

    class LMOps:                                       # language modelling on token ids: no task file needed
        has_uncertainty = False

        def loss(self, m, examples):
            ids = torch.stack(list(examples))
            return m(input_ids=ids, labels=ids).loss

        def metric(self, m):
            trained.update({n: p.detach().clone() for n, p in m.named_parameters() if "lora_" in n})
            with torch.no_grad():
                return -float(self.loss(m, pool))

    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    s = RecoverySettings(mode="lora", strategy="random", budget=8, rounds=2, steps_per_round=3, lr=1e-2,
                         batch_size=4)
    run = run_recovery(model, LMOps(), pool, s, mask=lambda: mask_experts(model, keep))
    assert run.labels_used == 8 and len(run.points) == 3
    moved = [n for n, p in trained.items() if "lora_B" in n and p.abs().sum() > 0]   # lora_B starts at 0
    assert any("Wqkv" in n for n in moved) and any("out_proj" in n for n in moved)
    assert not any(".lora_" in n for n, _ in model.named_parameters())               # adapters unloaded
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n])                                             # base weights untouched
