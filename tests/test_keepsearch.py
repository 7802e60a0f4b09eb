"""The attacker's searched keep-set: train rows only, never worse than its candidates, seeded, valid groups."""

from __future__ import annotations

from contextlib import contextmanager

import pytest
import torch

import moeharden.model.masking as masking
import moeharden.tasks.metrics as metrics
from moeharden.attack.attribution import keep_sets
from moeharden.attack.keepsearch import search_keepsets
from moeharden.demo import build as demo
from moeharden.model.keepset import check_keep_counts
from moeharden.model.masking import mask_experts
from moeharden.model.registry import moe_layers, routing_groups
from moeharden.tasks.examples import Example, Task
from moeharden.tasks.metrics import task_loss

torch.set_num_threads(1)


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


def _setup(model):
    info = moe_layers(model)
    layers, E = [li.layer for li in info], info[0].num_experts
    g = torch.Generator().manual_seed(0)
    # two attribution-like candidates from arbitrary score matrices
    cands = {m: {k: keep_sets(torch.rand(len(layers), E, generator=g), layers, k) for k in (1, 2)}
             for m in ("frequency", "gate")}
    return layers, E, cands


@torch.no_grad()
def _loss(model, tok, exs, keep):
    with mask_experts(model, keep):
        return float(task_loss(model, tok, exs))


def test_search_reads_train_rows_only_and_beats_its_candidates(tiny_demo, monkeypatch):
    model, tok, tasks = tiny_demo
    task = tasks["sentiment"]
    layers, E, cands = _setup(model)
    read: list[int] = []

    def spy(m, t, examples, **kw):
        read.extend(id(ex) for ex in examples)
        return task_loss(m, t, examples, **kw)

    monkeypatch.setattr(metrics, "task_loss", spy)
    best, scores = search_keepsets(model, tok, task, layers, E, [E, 2, 1], cands, n_random=4,
                                   hill_climb_swaps=6, rows=16, seed=0)
    monkeypatch.undo()
    rows = task.train[:16]
    assert set(read) == {id(ex) for ex in rows}            # the first 16 train rows, nothing else
    assert not set(read) & {id(ex) for ex in task.evaluation}
    assert not {ex.index for ex in rows} & {ex.index for ex in task.evaluation}
    assert sorted(best) == [1, 2]                         # K = E prunes nothing: not searched
    for k, keep in best.items():
        assert sorted(keep) == layers and all(len(ids) == k for ids in keep.values())
        got = _loss(model, tok, rows, keep)                 # recomputed outside the search
        assert scores[k]["loss"] == pytest.approx(got, rel=1e-5)
        for m in cands:
            assert got <= _loss(model, tok, rows, cands[m][k]) + 1e-6
        assert got <= min(c["loss"] for c in scores[k]["candidates"]) + 1e-6
        assert len(scores[k]["candidates"]) == 2 + 4 and scores[k]["rows"] == 16
        assert len(scores[k]["swaps"]) <= 6
        # hill climbing: a swap is kept exactly when it lowers the running best; the result is the last kept
        running = min(c["loss"] for c in scores[k]["candidates"] if c["loss"] is not None)
        for s in scores[k]["swaps"]:
            assert s["accepted"] == (s["loss"] is not None and s["loss"] < running)
            running = s["loss"] if s["accepted"] else running
        assert scores[k]["loss"] == running
    assert any(s["accepted"] for k in best for s in scores[k]["swaps"])  # the climb did move somewhere


def test_search_is_seeded(tiny_demo):
    model, tok, tasks = tiny_demo
    task = tasks["addition"]
    layers, E, cands = _setup(model)
    runs = [search_keepsets(model, tok, task, layers, E, [2], cands, n_random=3, hill_climb_swaps=4, rows=8,
                            seed=s) for s in (5, 5, 6)]
    assert runs[0] == runs[1]
    assert [c["loss"] for c in runs[0][1][2]["candidates"]] != [c["loss"] for c in runs[2][1][2]["candidates"]]


def test_random_keepsets_respect_routing_groups(monkeypatch):
    from families import build_tiny
    from tiny_lm import build_tokenizer

    tok = build_tokenizer()
    model, cfg = build_tiny("deepseek_v2", vocab_size=len(tok))
    spec = moe_layers(model)[0].spec
    assert routing_groups(spec, cfg) == 2
    layers = [li.layer for li in moe_layers(model)]
    exs = [Example("multiple_choice", f"the cat {i} . Answer:", c[i % 2], c, i % 2, i)
           for i, c in enumerate([(" positive", " negative")] * 8)]
    task = Task("t", "multiple_choice", "accuracy", 0.5, exs[:2], exs[2:4], exs[4:])
    masked: list[dict] = []
    real = masking.mask_experts

    @contextmanager
    def spy(m, keep):
        masked.append({k: list(v) for k, v in keep.items()})
        with real(m, keep):
            yield

    monkeypatch.setattr(masking, "mask_experts", spy)
    # K = 4: two per group (DeepSeek scores groups by their top 2); K = 2 and 3 cannot run
    best, scores = search_keepsets(model, tok, task, layers, 8, [4, 3, 2], {}, n_random=6, hill_climb_swaps=8,
                                   rows=4, seed=1, spec=spec, config=cfg)
    assert sorted(best) == [4]
    assert all(c["loss"] is not None for c in scores[4]["candidates"])  # every random keep-set is valid
    assert len(masked) >= 6
    for keep in [*masked, best[4]]:
        check_keep_counts(spec, cfg, keep)                 # balanced, enough per group: raises otherwise
        assert all(sum(1 for e in ids if e < 4) == 2 for ids in keep.values())
