"""The adaptive ladder attack: labels the loss reads never exceed a rung; the attacker's choices
never look at the evaluation split; references and summaries of the suite."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from moeharden.attack.realign.headstart import curve_area, labels_needed, summarize
from moeharden.attack.realign.ladder import LadderSettings, run_ladder
from moeharden.attack.realign.ladder_suite import (
    AttackPlan,
    SuiteContext,
    attacker_splits,
    ladder_rungs,
    plan_jobs,
    run_job,
)
from moeharden.attack.realign.taskops import task_ops
from moeharden.demo import build as demo
from moeharden.model.masking import mask_experts
from moeharden.model.registry import moe_layers
from moeharden.tasks.intervals import metric_interval
from moeharden.tasks.metrics import evaluate

SMALL = LadderSettings(rungs=(0, 4, 8, 16), prompt_rungs=(0, 8, 16), lrs=(1e-3, 3e-3), steps=(2, 4), batch_size=4)


@pytest.fixture(scope="module")
def tiny_demo(tmp_path_factory):
    from moeharden.model.checkpoint import load_model, load_tokenizer
    from moeharden.tasks.resolve import load_tasks

    d = tmp_path_factory.mktemp("demo")
    path = demo.build_demo_model(d / "model", steps=30)
    model, tok = load_model(path), load_tokenizer(path)
    tasks = {t.name: t for t in load_tasks(None, checkpoint_dir=path, limit=64)}
    return model, tok, tasks


class CountingOps:
    """Wraps task ops; records every distinct example whose label the loss reads, per call."""

    def __init__(self, ops):
        self.ops, self.seen, self.calls = ops, set(), []

    def __getattr__(self, name):
        return getattr(self.ops, name)

    def loss(self, model, examples):
        self.seen.update(id(ex) for ex in examples)
        self.calls.append(len(self.seen))
        return self.ops.loss(model, examples)


def _keep(model):
    return {li.layer: [0, 1] for li in moe_layers(model)}


def _run(model, tok, task, ops, pool, val, evaluation, strategy="random"):
    def score(m):
        return metric_interval(evaluate(m, tok, task, examples=evaluation))

    def val_score(m):
        return evaluate(m, tok, task, examples=val).value

    keep = _keep(model)
    return run_ladder(model, ops, pool, SMALL, strategy=strategy, seed=3, score=score, val_score=val_score,
                      mask=lambda: mask_experts(model, keep))


@pytest.mark.parametrize("strategy", ["random", "kcenter"])
def test_labels_read_never_exceed_the_rung(tiny_demo, strategy):
    model, tok, tasks = tiny_demo
    task = tasks["sentiment"]
    val, pool = attacker_splits(task, 8)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    ops = CountingOps(task_ops(tok, task))
    curve = _run(model, tok, task, ops, pool, val, task.evaluation[:16], strategy)
    assert [p.x for p in curve.points] == [0, 4, 8, 16]
    for p in curve.points[1:]:
        assert p.labels_read <= p.x and p.lr in SMALL.lrs and p.steps in SMALL.steps
    # counted independently of the ladder's own book-keeping: each trajectory reads ≤ 16 distinct labels
    assert max(ops.calls) <= 16 * len(SMALL.lrs) and len(ops.seen) <= 16 * len(SMALL.lrs)
    assert not ({id(ex) for ex in val} & ops.seen) and not ({id(ex) for ex in task.evaluation} & ops.seen)
    # the model is restored exactly
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_choices_never_look_at_the_evaluation_split(tiny_demo):
    model, tok, tasks = tiny_demo
    task = tasks["sentiment"]
    val, pool = attacker_splits(task, 8)
    ev = task.evaluation[:16]
    # the same evaluation rows with every label flipped: any choice that looked at them would change
    flipped = [dataclasses.replace(ex, label=1 - ex.label, target=ex.choices[1 - ex.label]) for ex in ev]
    a = _run(model, tok, task, task_ops(tok, task), pool, val, ev)
    b = _run(model, tok, task, task_ops(tok, task), pool, val, flipped)
    choice = lambda c: [(p.lr, p.schedule, p.steps, p.total_steps, p.val_metric) for p in c.points]  # noqa: E731
    assert choice(a) == choice(b)
    # and the reported metrics are the evaluation split's (flipped labels: 1 - accuracy)
    for pa, pb in zip(a.points, b.points, strict=True):
        assert pa.metric + pb.metric == pytest.approx(1.0)


def test_rungs_reach_the_whole_pool():
    assert ladder_rungs((0, 16, 32, 64, 128, 256, 512), 448) == [0, 16, 32, 64, 128, 256, 448]
    assert ladder_rungs((0, 16, 32), 1000) == [0, 16, 32]


def test_plan_and_suite_curves(tiny_demo):
    model, tok, tasks = tiny_demo
    plan = AttackPlan(seeds=(0,), validation_size=8, ladder=SMALL, strategies=("random",))
    jobs = plan_jobs(["sentiment"], plan, skip={("sentiment", "scratch", "distill")})
    assert {(j.reference, j.attack) for j in jobs} == {("pruned", "labels"), ("pruned", "distill"),
                                                      ("shared", "labels"), ("shared", "distill"),
                                                      ("scratch", "labels")}
    t = dataclasses.replace(tasks["sentiment"], evaluation=tasks["sentiment"].evaluation[:16])
    ctx = SuiteContext(model, tok, [t], {"sentiment": _keep(model)}, plan)
    curves = [run_job(ctx, j) for j in jobs]
    for c in curves:
        assert c["points"][0]["x"] == 0 and all(p["lo"] <= p["metric"] <= p["hi"] for p in c["points"])
    distill = next(c for c in curves if c["attack"] == "distill" and c["reference"] == "pruned")
    assert all(p["labels_read"] <= p["x"] for p in distill["points"])
    s = summarize(curves, full={"sentiment": 1.0}, higher={"sentiment": True}, target_fraction=0.95)
    hs = s["sentiment"]["attacks"]["labels"]["expert_head_start"]
    assert hs is not None and hs["area"] == pytest.approx(
        s["sentiment"]["attacks"]["labels"]["references"]["pruned"]["area"]
        - s["sentiment"]["attacks"]["labels"]["references"]["shared"]["area"], abs=1e-6)


def test_headstart_figures_by_hand():
    pts = [{"x": 0, "metric": 0.5}, {"x": 16, "metric": 0.8}, {"x": 32, "metric": 0.97}]
    assert labels_needed(pts, 0.95, True) == 32 and labels_needed(pts, 0.99, True) is None
    assert curve_area(pts, 1.0, True) == pytest.approx((0.5 + 0.8 + 0.97) / 3)
    ppl = [{"x": 0, "metric": 40.0}, {"x": 16, "metric": 20.0}]
    assert curve_area(ppl, 10.0, False) == pytest.approx((0.25 + 0.5) / 2)
    curve = lambda ref, seed, ms: {"task": "t", "attack": "labels", "reference": ref, "strategy": "random",  # noqa: E731
                                   "seed": seed, "points": [{"x": x, "metric": m} for x, m in zip((0, 16, 32), ms, strict=True)]}
    curves = [curve("pruned", 0, (0.5, 0.96, 1.0)), curve("pruned", 1, (0.5, 0.7, 0.96)),
              curve("shared", 0, (0.5, 0.6, 0.96)), curve("shared", 1, (0.5, 0.6, 0.7)),
              curve("shared", 2, (0.5, 0.6, 0.96))]
    s = summarize(curves, full={"t": 1.0}, higher={"t": True}, target_fraction=0.95)["t"]["attacks"]["labels"]
    assert s["references"]["pruned"]["labels"] == 16          # the strongest seed
    assert s["references"]["shared"]["labels"] == 32          # median of 32, 32, never
    hs = s["expert_head_start"]
    assert hs["labels"] == 16 and hs["labels_ratio"] == 0.5
    assert hs["area"] == pytest.approx((0.5 + 0.96 + 1.0) / 3 - ((0.5 + 0.6 + 0.96) / 3 * 2 + (0.5 + 0.6 + 0.7) / 3) / 3,
                                       abs=1e-5)
    assert s["theft_head_start"] is None


def _recording(monkeypatch):
    """Record (lr, rung, validation, evaluation metric) of every trajectory's every rung."""
    from moeharden.attack.realign import ladder as lad

    log = []
    orig = lad._Trajectory.rung

    def rung(self, n, higher, best_possible=None):
        res = orig(self, n, higher, best_possible)
        log.append((self.lr, n, res.val, res.metric[0]))
        return res

    monkeypatch.setattr(lad._Trajectory, "rung", rung)
    return log


def test_trajectories_advancing_together_do_not_leak_into_each_other(tiny_demo, monkeypatch):
    """Each trajectory keeps its own weights and optimizer state while they take turns in one model:
    the 3e-3 trajectory gives the same numbers alone and beside the 1e-3 one."""
    model, tok, tasks = tiny_demo
    task = tasks["sentiment"]
    val, pool = attacker_splits(task, 8)
    log = _recording(monkeypatch)
    keep = _keep(model)

    def go(lrs):
        s = dataclasses.replace(SMALL, lrs=lrs, halving_every=0)
        run_ladder(model, task_ops(tok, task), pool, s, seed=3, val_score=lambda m: evaluate(m, tok, task, examples=val).value,
                   score=lambda m: metric_interval(evaluate(m, tok, task, examples=task.evaluation[:16])),
                   mask=lambda: mask_experts(model, keep))

    go((1e-3, 3e-3))
    together = [r for r in log if r[0] == 3e-3]
    log.clear()
    go((3e-3,))
    assert log == together and len(together) == 3


def test_successive_halving_keeps_the_better_half(tiny_demo, monkeypatch):
    model, tok, tasks = tiny_demo
    task = tasks["sentiment"]
    val, pool = attacker_splits(task, 8)
    log = _recording(monkeypatch)
    keep = _keep(model)
    s = dataclasses.replace(SMALL, lrs=(3e-4, 1e-3, 3e-3), halving_every=2)
    curve = run_ladder(model, task_ops(tok, task), pool, s, seed=3,
                       val_score=lambda m: evaluate(m, tok, task, examples=val).value,
                       score=lambda m: metric_interval(evaluate(m, tok, task, examples=task.evaluation[:16])),
                       mask=lambda: mask_experts(model, keep))
    at = lambda n: [r for r in log if r[1] == n]  # noqa: E731
    assert len(at(4)) == len(at(8)) == 3 and len(at(16)) == 2           # ⌈3/2⌉ go on after two rungs
    ranked = sorted(at(8), key=lambda r: -r[2])                          # by validation at rung 8
    assert {r[0] for r in at(16)} == {r[0] for r in ranked[:2]} or ranked[1][2] == ranked[2][2]
    assert curve.points[-1].lr in {r[0] for r in at(16)}               # the last rung's choice is a survivor
