"""Confidence intervals against hand computations and a brute-force check of the bootstrap."""

from __future__ import annotations

import math

import pytest

from moeharden.tasks.intervals import (
    bootstrap,
    mean_interval,
    perplexity_interval,
    retained_upper,
    wilson,
)


def test_wilson_matches_a_hand_computation():
    # k = 8, n = 10, z = 1.96: centre = (0.8 + 0.19208) / 1.38416 = 0.716738,
    # half = 1.96 / 1.38416 * sqrt(0.016 + 0.009604) = 0.226581 (Newcombe 1998, table I: 0.4902-0.9433)
    lo, hi = wilson(8, 10, z=1.96)
    assert lo == pytest.approx(0.4901568, abs=1e-6) and hi == pytest.approx(0.9433191, abs=1e-6)
    lo, hi = wilson(0, 10, z=1.96)
    assert lo == 0.0 and hi == pytest.approx(0.2775402, abs=1e-6)
    lo, hi = wilson(128, 128)
    assert hi == 1.0 and lo == pytest.approx(128 / (128 + 1.959963984540054 ** 2), abs=1e-9)
    assert wilson(0, 0) == (0.0, 1.0)


def test_wilson_contains_the_estimate_and_shrinks_with_n():
    for k, n in [(1, 3), (50, 100), (97, 100), (500, 1000)]:
        lo, hi = wilson(k, n)
        assert lo <= k / n <= hi
    assert (wilson(80, 100)[1] - wilson(80, 100)[0]) > (wilson(800, 1000)[1] - wilson(800, 1000)[0])


def test_bootstrap_is_seeded_and_brackets_the_mean():
    xs = [0.1, 0.4, 0.35, 0.8, 0.9, 0.2, 0.55, 0.6]
    a, b = mean_interval(xs), mean_interval(xs)
    assert a == b
    m = sum(xs) / len(xs)
    assert a[0] < m < a[1]
    # a constant sample has a zero-width interval
    assert mean_interval([0.5] * 20) == (0.5, 0.5)
    assert math.isnan(bootstrap([], lambda v: 0.0)[0])


def test_perplexity_interval_brackets_corpus_perplexity():
    docs = [(10.0, 5), (30.0, 10), (4.0, 4), (20.0, 8)]
    ppl = math.exp(sum(d[0] for d in docs) / sum(d[1] for d in docs))
    lo, hi = perplexity_interval(docs)
    assert lo <= ppl <= hi and lo >= math.exp(1.0) - 1e-9 and hi <= math.exp(3.0) + 1e-9


def test_retained_upper_is_conservative():
    # pruned 0.6 [0.5, 0.7], full 1.0 [0.97, 1.0], chance 0.5 -> (0.7 - 0.5) / (0.97 - 0.5)
    assert retained_upper(0.7, 0.97, 0.5) == pytest.approx(0.2 / 0.47)
    assert retained_upper(0.7, 0.5, 0.5) is None
    assert retained_upper(0.7, 0.9, None) is None
