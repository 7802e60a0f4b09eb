"""Pure-math pieces of the attack suite, each checked against an independent computation."""

from __future__ import annotations

import itertools
import math
import random

import pytest
import torch

from moeharden.attack.attribution import RoutingStats, contrastive_scores, keep_sets
from moeharden.attack.realign import entropy_scores, kcenter_greedy, labels_to_recover, margin_scores
from moeharden.attack.sweep import (
    above_chance_retained,
    default_keeps,
    headline,
    retained_fraction,
    run_sweep,
)
from moeharden.audit.gate import Gate, gate_rows


def test_default_keeps_for_8_experts_top2():
    assert default_keeps(8, 2) == [8, 6, 4, 2, 1]
    assert default_keeps(64, 8) == [64, 48, 32, 16, 8, 1]


def test_retained_and_above_chance():
    assert retained_fraction("accuracy", 0.45, 0.9) == pytest.approx(0.5)
    # perplexity: full 10, pruned 20 -> normalized perplexity 200 -> retained 100/200
    assert retained_fraction("perplexity", 20.0, 10.0) == pytest.approx(0.5)
    assert above_chance_retained(0.75, 1.0, 0.5) == pytest.approx(0.5)
    assert above_chance_retained(0.5, 0.5, 0.5) is None


def test_keep_sets_per_layer_matches_brute_force():
    g = torch.Generator().manual_seed(0)
    scores = torch.rand(3, 8, generator=g)
    for k in range(1, 8):
        ks = keep_sets(scores, [1, 3, 5], k)
        for row, layer in enumerate([1, 3, 5]):
            best = max(itertools.combinations(range(8), k), key=lambda c: sum(float(scores[row, e]) for e in c))
            assert ks[layer] == sorted(best)


def test_keep_sets_global_keeps_same_ids_in_every_layer():
    scores = torch.tensor([[0.0, 1.0, 5.0, 2.0], [10.0, 0.0, 30.0, 20.0]])
    ks = keep_sets(scores, [0, 1], 2, ranking="global")
    # shares: layer0 [0, .125, .625, .25], layer1 [0, 0, .6, .4] -> summed: e2 (1.225) > e3 (.65)
    assert ks == {0: [2, 3], 1: [2, 3]}


def test_contrastive_is_rate_difference():
    a = RoutingStats([0], 4, count=torch.tensor([[6.0, 2.0, 0.0, 0.0]], dtype=torch.float64))
    b = RoutingStats([0], 4, count=torch.tensor([[0.0, 2.0, 2.0, 4.0]], dtype=torch.float64))
    c = contrastive_scores(a, [b])
    assert c[0].tolist() == pytest.approx([0.75, 0.0, -0.25, -0.5])


def test_entropy_and_margin_scores():
    lp = torch.log(torch.tensor([[0.5, 0.5], [0.9, 0.1], [0.2, 0.8]]))
    ent = entropy_scores(lp)
    manual = [-(p * math.log(p) + (1 - p) * math.log(1 - p)) for p in (0.5, 0.9, 0.2)]
    assert ent.tolist() == pytest.approx(manual, abs=1e-6)
    assert margin_scores(lp).tolist() == pytest.approx([0.0, -0.8, -0.6], abs=1e-6)


def test_kcenter_greedy_is_farthest_point():
    pts = torch.tensor([[0.0, 0.0], [1.0, 0.0], [10.0, 0.0], [0.0, 7.0], [5.0, 5.0]])
    chosen = kcenter_greedy(pts, [0], 2, random.Random(0))
    # farthest from (0,0) is (10,0); then farthest from {(0,0),(10,0)} is (0,7) (dist 7) vs (5,5) (7.07)
    assert chosen == [2, 4]


def test_labels_to_recover_first_crossing():
    assert labels_to_recover([(0, 0.3), (16, 0.8), (32, 0.96), (48, 0.9)], 0.95) == 32
    assert labels_to_recover([(0, 0.3), (16, 0.5)], 0.95) is None


def _doc(full, sweep, ltr=None):
    return {"model": {"num_experts": 8}, "tasks": [{"name": "t", "metric": "accuracy", "full": full, "chance": 0.5}],
            "sweep": sweep, "labels_to_recover": ltr or {}, "recovery_settings": {"budget": 64, "rounds": 4}}


def test_gate_rows_pass_and_fail():
    base = _doc(1.0, [], {"t": {"random": 16.0, "entropy": 16.0}})
    bad = _doc(0.97, [{"task": "t", "method": "reap", "keep": 2, "above_chance": 0.8, "retained": 0.9},
                      {"task": "t", "method": "random", "keep": 4, "above_chance": 0.2, "retained": 0.6}],
               {"t": {"random": 32.0, "entropy": None}})
    rows = {(r["check"], r.get("keep")): r for r in gate_rows(Gate(), base, bad)}
    assert not rows[("full_metric_fraction", None)]["pass"]          # 0.97 < 0.98
    assert not rows[("worst_above_chance_retained", 2)]["pass"]       # 0.8 > 0.5
    assert rows[("worst_above_chance_retained", 4)]["pass"]
    assert not rows[("labels_to_recover", None)]["pass"]              # 32 < 5 x 16
    good = _doc(0.99, [{"task": "t", "method": "reap", "keep": 2, "above_chance": 0.1, "retained": 0.55}],
                {"t": {"random": None, "entropy": None}})
    assert all(r["pass"] for r in gate_rows(Gate(), base, good))


def test_run_sweep_random_control_and_cache():
    calls = []

    def ev(keep):
        calls.append(keep)
        return 0.5 + 0.1 * sum(len(v) for v in keep.values()) / 8

    scores = {"frequency": torch.arange(16.0).reshape(2, 8), "gate": torch.arange(16.0).reshape(2, 8)}
    rows, used = run_sweep(task="t", metric="accuracy", full=1.0, chance=0.5, layers=[0, 1], num_experts=8,
                           scores=scores, keeps=[8, 4, 2], evaluate_masked=ev, random_seeds=(0, 1, 2))
    assert used["frequency"][2] == {0: [6, 7], 1: [6, 7]}
    # identical keep-sets of frequency and gate are evaluated once
    keys = [tuple(sorted((k, tuple(v)) for k, v in c.items())) for c in calls]
    assert len(keys) == len(set(keys))
    rnd = [r for r in rows if r.method == "random" and r.keep == 2][0]
    assert rnd.seeds == (0, 1, 2) and rnd.metric == pytest.approx(0.5 + 0.1 * 4 / 8)
    h = headline(rows, 8)
    assert h["keep_25"]["keep"] == 2 and h["keep_50"]["keep"] == 4
