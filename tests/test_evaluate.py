"""Metrics against independent computations: unbatched, unpadded forwards on a tiny real MoE LM."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from tiny_lm import build_model, build_tokenizer

from moeharden.tasks.encoding import encode_pairs
from moeharden.tasks.examples import Example, Task
from moeharden.tasks.intervals import mean_interval, perplexity_interval, wilson
from moeharden.tasks.metrics import (
    choice_logprobs,
    evaluate,
    generate_greedy,
    normalized_perplexity,
    perplexity,
    perplexity_windows,
    task_loss,
)
from moeharden.tasks.rouge import rouge_scores
from moeharden.tasks.spec import SplitSpec, TaskSpec

torch.set_num_threads(1)

DOCS = [
    "Robert is an English film , television and theatre actor . He had a guest role in the series .",
    "The owners said their planned development at the site would create jobs for the town .",
    "it 's a charming and often affecting journey .",
]


@pytest.fixture(scope="module")
def lm():
    tok = build_tokenizer()
    return build_model(tok), tok


def _ids(tok, text):
    return tok(text).input_ids


def _full_logprobs(model, ids):
    """Log-probs of one unpadded sequence, ``[L, V]``."""
    with torch.no_grad():
        return torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].float(), -1)


def _cont_logprob(model, ctx, cont):
    lp = _full_logprobs(model, ctx + cont)
    return sum(float(lp[len(ctx) - 1 + j, t]) for j, t in enumerate(cont))


def _mc_examples():
    out = []
    prompts = ["the cat sat on the mat . Answer:", "Question: Is this sentence positive or negative?\nAnswer:",
               "He had", "development at the site would create jobs . Sentiment:", "Q:"]
    choice_sets = [(" positive", " negative"), ("A", "B", "C"), (" a guest role", " no", " television actor"),
                   ("P", "N"), (" yes", " no and never")]
    for i, (p, cs) in enumerate(zip(prompts, choice_sets, strict=True)):
        out.append(Example("multiple_choice", p, cs[i % len(cs)], cs, i % len(cs), i))
    return out


def test_choice_logprobs_match_unbatched_forwards(lm):
    model, tok = lm
    exs = _mc_examples()
    enc = [encode_pairs(tok, [(ex.prompt, c) for c in ex.choices]) for ex in exs]
    # both scoring paths are exercised: single-token choices (one forward) and multi-token ones
    assert any(all(len(c) == 1 for _, c in e) for e in enc)
    assert any(any(len(c) > 1 for _, c in e) for e in enc)
    got = choice_logprobs(model, tok, exs, batch_size=2)
    for i, ex in enumerate(exs):
        for j, c in enumerate(ex.choices):
            ctx = _ids(tok, ex.prompt)
            cont = _ids(tok, ex.prompt + c)[len(ctx):]  # lm-eval's split of the whole encoding
            assert got[i, j].item() == pytest.approx(_cont_logprob(model, ctx, cont), abs=1e-4)
    assert torch.isinf(got[0, 2])  # ragged choice counts are padded with -inf
    expected_acc = sum(
        max(range(len(ex.choices)), key=lambda j, i=i: got[i, j].item()) == ex.label for i, ex in enumerate(exs)
    ) / len(exs)
    task = Task("mc", "multiple_choice", "accuracy", 0.5, exs[:1], exs, [])
    res = evaluate(model, tok, task, batch_size=3)
    assert res.value == pytest.approx(expected_acc) and res.n == len(exs)


def test_perplexity_full_window_equals_model_loss(lm):
    model, tok = lm
    nll, n = 0.0, 0
    for d in DOCS:
        ids = torch.tensor([_ids(tok, d)])
        with torch.no_grad():
            loss = float(model(input_ids=ids, labels=ids).loss)  # mean over tokens 1..L-1
        nll += loss * (ids.shape[1] - 1)
        n += ids.shape[1] - 1
    r = perplexity(model, tok, DOCS, window=128, stride=64, batch_size=2)
    assert r["tokens"] == n
    assert r["perplexity"] == pytest.approx(math.exp(nll / n), rel=1e-4)


def test_sliding_window_matches_manual_loop(lm):
    model, tok = lm
    ids = _ids(tok, " ".join(DOCS * 3))
    window, stride = 24, 8
    n = window + stride * ((len(ids) - window) // stride)  # the last window is full: HF guide's windows
    ids = ids[:n]
    # Hugging Face perplexity guide: windows start every `stride` tokens; only new tokens are scored
    nll, count, prev_end = 0.0, 0, 0
    for begin in range(0, n, stride):
        end = min(begin + window, n)
        trg = end - prev_end
        x = torch.tensor([ids[begin:end]])
        labels = x.clone()
        labels[:, :-trg] = -100
        with torch.no_grad():
            loss = float(model(input_ids=x, labels=labels).loss)
        k = int((labels[:, 1:] != -100).sum())
        nll, count, prev_end = nll + loss * k, count + k, end
        if end == n:
            break
    text = tok.decode(ids)
    assert _ids(tok, text) == ids
    r = perplexity(model, tok, [text], window=window, stride=stride, batch_size=3)
    assert r["tokens"] == count == n - 1
    assert r["perplexity"] == pytest.approx(math.exp(nll / count), rel=1e-4)


@pytest.mark.parametrize("n", [1, 2, 5, 24, 25, 31, 100])
def test_windows_score_every_token_once(n):
    scored = []
    for begin, end, k in perplexity_windows(n, 24, 7):
        assert 0 <= begin and end - begin <= 24 and k <= end - begin - 1
        scored += range(end - k, end)
    assert scored == list(range(1, n))


def test_greedy_generation_matches_unbatched_loop(lm):
    model, tok = lm
    prompts = ["He had a guest", "Article: The owners said", "it", "Question: Is this"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = generate_greedy(model, tok, prompts, max_new_tokens=6, stop=(), batch_size=3)
    # the cache goes by the name the installed transformers' forward takes (no deprecation warning)
    assert not [w for w in caught if "past_key_values" in str(w.message)]
    for p, g in zip(prompts, got, strict=True):
        ids = _ids(tok, p)
        new = []
        for _ in range(6):  # no cache, no padding
            nxt = int(_full_logprobs(model, ids)[-1].argmax())
            if nxt == tok.eos_token_id:
                break
            ids, new = ids + [nxt], new + [nxt]
        assert g == tok.decode(new, skip_special_tokens=True)
    # a stop string cuts the text at its first occurrence
    text = got[0]
    if len(text) > 2:
        stop = text[1]
        cut = generate_greedy(model, tok, prompts[:1], max_new_tokens=6, stop=(stop,))[0]
        assert cut == text[: text.index(stop)]


def test_exact_match_counts_the_model_own_answers(lm):
    model, tok = lm
    prompts = ["He had", "the cat", "Answer:", "it 's"]
    own = generate_greedy(model, tok, prompts, max_new_tokens=4, stop=(), batch_size=1)
    # half the targets are the model's own greedy answers, half can never be produced
    exs = [Example("generation", p, o if i % 2 == 0 else "@@never@@", index=i)
           for i, (p, o) in enumerate(zip(prompts, own, strict=True))]
    spec = TaskSpec(name="gen", kind="generation", data={"path": "x.jsonl"}, prompt="{text}", target_field="t",
                    max_new_tokens=4, stop=[], split=SplitSpec(attribution=1))
    task = Task("gen", "generation", "exact_match", None, exs[:1], exs, [], spec)
    res = evaluate(model, tok, task, batch_size=3)
    assert res.value == pytest.approx(0.5)
    spec_r = spec.model_copy(update={"metric": "rouge1"})
    res = evaluate(model, tok, Task("gen", "generation", "rouge1", None, exs[:1], exs, [], spec_r))
    expected = sum(rouge_scores(o, ex.target)["rouge1"] for o, ex in zip(own, exs, strict=True)) / 4
    assert res.value == pytest.approx(expected) and res.extra["exact_match"] == pytest.approx(0.5)


@pytest.mark.parametrize("impl", ["builtin", "rouge_score"])
def test_rouge_known_pair(impl):
    if impl == "rouge_score":
        pytest.importorskip("rouge_score")
    r = rouge_scores("the cat sat on the mat", "the cat is on the mat", impl=impl)
    # unigrams: 5 of 6 shared (the x2, cat, on, mat) -> P = R = F = 5/6
    assert r["rouge1"] == pytest.approx(5 / 6)
    # bigrams: "the cat", "on the", "the mat" of 5 each -> 3/5
    assert r["rouge2"] == pytest.approx(3 / 5)
    # LCS "the cat on the mat" = 5 of 6
    assert r["rougeL"] == pytest.approx(5 / 6)
    assert rouge_scores("", "the cat", impl=impl)["rouge1"] == 0.0


def test_task_loss_matches_per_example_nll_and_is_differentiable(lm):
    model, tok = lm
    exs = _mc_examples()[:3] + [Example("generation", "He had", " a guest role", index=9),
                                Example("perplexity", "", DOCS[0], index=10)]
    nll, n = 0.0, 0
    for ex in exs:
        if ex.kind == "perplexity":
            ids = _ids(tok, ex.target)
            ctx, cont = ids[:1], ids[1:]
        else:
            ctx = _ids(tok, ex.prompt)
            cont = _ids(tok, ex.prompt + ex.target)[len(ctx):]
            if ex.kind == "generation":
                cont = cont + [tok.eos_token_id]
        nll -= _cont_logprob(model, ctx, cont)
        n += len(cont)
    model.zero_grad()
    loss = task_loss(model, tok, exs, batch_size=2)
    assert loss.item() == pytest.approx(nll / n, rel=1e-4)
    loss.backward()
    assert model.lm_head.weight.grad is not None and model.lm_head.weight.grad.abs().sum() > 0
    model.zero_grad()


def test_normalized_perplexity_and_training_flag(lm):
    model, tok = lm
    assert normalized_perplexity(30.0, 20.0) == pytest.approx(150.0)
    spec = TaskSpec(name="ppl", kind="perplexity", data={"path": "x.txt"}, window=16, stride=8)
    exs = [Example("perplexity", "", d, index=i) for i, d in enumerate(DOCS)]
    model.train()
    res = evaluate(model, tok, Task("ppl", "perplexity", "perplexity", None, exs[:1], exs, [], spec))
    assert model.training  # evaluation switches to eval mode and back
    model.eval()
    direct = perplexity(model, tok, DOCS, window=16, stride=8)
    assert res.value == pytest.approx(direct["perplexity"]) and res.normalized(res.value) == pytest.approx(100.0)


# --------------------------------------------------------------------------- 95% intervals
def test_accuracy_interval_is_wilson_on_the_recounted_correct(lm):
    model, tok = lm
    exs = _mc_examples()
    lp = choice_logprobs(model, tok, exs, batch_size=2)
    k = sum(int(lp[i].argmax()) == ex.label for i, ex in enumerate(exs))  # recount from the predictions
    res = evaluate(model, tok, Task("mc", "multiple_choice", "accuracy", 0.5, exs[:1], exs, []), batch_size=3)
    assert (res.lo, res.hi) == pytest.approx(wilson(k, len(exs)))
    assert res.lo <= res.value <= res.hi
    d = res.to_dict()
    assert d["lo"] == res.lo and d["hi"] == res.hi and d["value"] == res.value


def test_exact_match_and_rouge_intervals(lm):
    model, tok = lm
    prompts = ["He had", "the cat", "Answer:", "it 's", "Q:", "development"]
    own = generate_greedy(model, tok, prompts, max_new_tokens=4, stop=(), batch_size=1)
    exs = [Example("generation", p, o if i % 3 == 0 else "@@never@@ " + o, index=i)
           for i, (p, o) in enumerate(zip(prompts, own, strict=True))]
    spec = TaskSpec(name="gen", kind="generation", data={"path": "x.jsonl"}, prompt="{text}", target_field="t",
                    max_new_tokens=4, stop=[], split=SplitSpec(attribution=1))
    res = evaluate(model, tok, Task("gen", "generation", "exact_match", None, exs[:1], exs, [], spec))
    assert res.value == pytest.approx(2 / 6)
    assert (res.lo, res.hi) == pytest.approx(wilson(2, 6)) and res.lo <= res.value <= res.hi
    spec_r = spec.model_copy(update={"metric": "rougeL"})
    res = evaluate(model, tok, Task("gen", "generation", "rougeL", None, exs[:1], exs, [], spec_r))
    per_example = [rouge_scores(o, ex.target)["rougeL"] for o, ex in zip(own, exs, strict=True)]
    assert (res.lo, res.hi) == pytest.approx(mean_interval(per_example))
    assert res.lo <= res.value <= res.hi and res.lo < res.hi


def test_perplexity_interval_is_the_document_bootstrap(lm):
    model, tok = lm
    docs = []
    for d in DOCS:  # each document fits one window: its summed nll is the model's own loss
        ids = torch.tensor([_ids(tok, d)])
        with torch.no_grad():
            loss = float(model(input_ids=ids, labels=ids).loss)
        docs.append((loss * (ids.shape[1] - 1), ids.shape[1] - 1))
    r = perplexity(model, tok, DOCS, window=128, stride=64, batch_size=2)
    assert [t for _, t in r["docs"]] == [t for _, t in docs]
    assert [x for x, _ in r["docs"]] == pytest.approx([x for x, _ in docs], rel=1e-4)
    spec = TaskSpec(name="ppl", kind="perplexity", data={"path": "x.txt"}, window=128, stride=64)
    exs = [Example("perplexity", "", d, index=i) for i, d in enumerate(DOCS)]
    res = evaluate(model, tok, Task("ppl", "perplexity", "perplexity", None, exs[:1], exs, [], spec))
    lo, hi = perplexity_interval(docs)  # same (default) seed and resamples
    assert res.lo == pytest.approx(lo, rel=1e-4) and res.hi == pytest.approx(hi, rel=1e-4)
    assert res.lo <= res.value <= res.hi and res.lo < res.hi


def test_lm_eval_intervals_are_wilson_for_proportions_only():
    from moeharden.tasks.lmeval import proportion_interval

    assert proportion_interval("acc", 0.75, 8) == pytest.approx(wilson(6, 8))
    assert proportion_interval("acc_norm", 0.5, 10) == pytest.approx(wilson(5, 10))
    assert proportion_interval("perplexity", 12.0, 10) == (None, None)
    assert proportion_interval("acc", 0.5, 0) == (None, None)
    assert proportion_interval("bleu", 0.3, 10) == (None, None)
