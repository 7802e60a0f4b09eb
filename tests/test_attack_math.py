"""Pure-math pieces of the attack suite, each checked against an independent computation."""

from __future__ import annotations

import itertools
import math
import random

import pytest
import torch

from moeharden.attack.attribution import RoutingStats, contrastive_scores, keep_sets
from moeharden.attack.realign.run import labels_to_recover
from moeharden.attack.realign.selection import entropy_scores, kcenter_greedy, margin_scores
from moeharden.attack.sweep import (
    above_chance_retained,
    default_keeps,
    headline,
    retained_fraction,
    run_sweep,
)


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


def test_run_sweep_rows_carry_intervals_and_conservative_retained():
    def ev(keep):  # value and a hand-made interval, both growing with the experts kept
        kept = sum(len(v) for v in keep.values())
        v = 0.5 + 0.05 * kept
        return v, v - 0.1, v + 0.05

    scores = {"frequency": torch.arange(16.0).reshape(2, 8)}
    rows, _ = run_sweep(task="t", metric="accuracy", full=0.9, chance=0.5, layers=[0, 1], num_experts=8,
                        scores=scores, keeps=[8, 4], evaluate_masked=ev, random_seeds=(0, 1),
                        full_interval=(0.8, 0.95))
    r = next(r for r in rows if r.method == "frequency" and r.keep == 4)
    assert (r.metric, r.pruned_lo, r.pruned_hi) == pytest.approx((0.9, 0.8, 0.95))
    # the attacker's best end (0.95) over the full model's worst end (0.8), both above chance 0.5
    assert r.above_chance_hi == pytest.approx((0.95 - 0.5) / (0.8 - 0.5))
    assert r.retained_hi == pytest.approx(0.95 / 0.8)
    assert r.above_chance == pytest.approx(1.0) and r.retained == pytest.approx(1.0)  # meanings kept
    d = r.to_dict()
    assert d["pruned_lo"] == pytest.approx(0.8) and d["above_chance_hi"] == pytest.approx(1.5)
    full_row = next(r for r in rows if r.method == "random" and r.keep == 8)
    assert (full_row.pruned_lo, full_row.pruned_hi) == (0.8, 0.95)
    rnd = next(r for r in rows if r.method == "random" and r.keep == 4)
    assert rnd.pruned_lo == pytest.approx(rnd.metric - 0.1) and rnd.pruned_hi == pytest.approx(rnd.metric + 0.05)


def test_run_sweep_intervals_follow_metric_direction_and_floats_stay_as_before():
    scores = {"frequency": torch.arange(16.0).reshape(2, 8)}
    rows, _ = run_sweep(task="t", metric="perplexity", full=10.0, chance=None, layers=[0, 1], num_experts=8,
                        scores=scores, keeps=[2], evaluate_masked=lambda keep: (20.0, 16.0, 25.0),
                        random_seeds=(0,), full_interval=(9.0, 12.0))
    r = rows[0]
    # lower is better: the attacker's best end is the lowest perplexity (16), the full model's worst 12
    assert r.retained == pytest.approx(0.5) and r.retained_hi == pytest.approx(12.0 / 16.0)
    assert r.above_chance_hi is None
    rows, _ = run_sweep(task="t", metric="accuracy", full=1.0, chance=0.5, layers=[0, 1], num_experts=8,
                        scores=scores, keeps=[2], evaluate_masked=lambda keep: 0.75, random_seeds=(0,))
    assert rows[0].to_dict() == {"task": "t", "method": "frequency", "keep": 2, "metric": 0.75, "retained": 0.75,
                                 "above_chance": 0.5}


def test_run_sweep_evaluates_extra_keepsets_like_a_method():
    seen = []

    def ev(keep):
        seen.append(keep)
        return 0.5 + 0.1 * sum(e for v in keep.values() for e in v) / 28

    scores = {"frequency": torch.arange(16.0).reshape(2, 8)}
    search = {2: {0: [1, 3], 1: [0, 2]}, 4: {0: [4, 5, 6, 7], 1: [4, 5, 6, 7]}}  # K = 4 equals frequency's
    rows, used = run_sweep(task="t", metric="accuracy", full=1.0, chance=0.5, layers=[0, 1], num_experts=8,
                           scores=scores, keeps=[8, 4, 2], evaluate_masked=ev, random_seeds=(0,),
                           extra_keepsets={"search": search})
    assert used["search"] == search
    s2 = next(r for r in rows if r.method == "search" and r.keep == 2)
    assert s2.metric == pytest.approx(0.5 + 0.1 * 6 / 28)
    assert s2.retained == pytest.approx(s2.metric) and s2.above_chance == pytest.approx((s2.metric - 0.5) / 0.5)
    assert {r.method for r in rows if r.keep == 8} == {"frequency", "search", "random"}
    keys = [tuple(sorted((k, tuple(v)) for k, v in c.items())) for c in seen]
    assert len(keys) == len(set(keys))  # search's K = 4 set is frequency's: evaluated once
