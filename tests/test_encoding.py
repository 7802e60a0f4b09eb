"""One encoding: the loss an example contributes in training is the NLL evaluation scores for it.

On a tiny real Mixtral with a byte-level BPE (where encoding prompt and answer separately and
encoding the pair whole give different tokens), every example's token ids are checked against
lm-evaluation-harness's split written out independently here, and the summed cross-entropy of its
answer tokens in a padded :func:`encode` batch against the metrics scorer's negative log-likelihood.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from tiny_lm import build_model, build_tokenizer

from moeharden.tasks.encoding import answer_logits, choice_logprobs, encode, encode_pairs, example_requests
from moeharden.tasks.examples import Example
from moeharden.tasks.metrics import answer_nll, task_loss
from moeharden.tasks.metrics import choice_logprobs as eval_choice_logprobs

torch.set_num_threads(1)

MC_MULTI = Example("multiple_choice", "He had", " a guest role", (" no", " a guest role", " television actor"), 1)
MC_SINGLE = Example("multiple_choice", "Question: Is this sentence positive or negative?\nAnswer:", "B",
                    ("A", "B", "C"), 1)
# the trailing space of the prompt moves onto the answer, as lm-eval does
GEN = Example("generation", "Article: The owners said their planned development ", "at the site would create jobs")
LONG = Example("generation", "Sentence 1: the cat sat on the mat\nSentence 2: a cat was sitting\nDo both "
               "sentences mean the same thing?", " yes, it 's a charming and often affecting journey .")


@pytest.fixture(scope="module")
def lm():
    tok = build_tokenizer()
    return build_model(tok), tok


def _lm_eval_pair(tok, ctx: str, cont: str, prefix: list[int]) -> tuple[list[int], list[int]]:
    """lm-evaluation-harness's ``HFLM._encode_pair``, written out independently of moeharden."""
    n_spaces = len(ctx) - len(ctx.rstrip())
    if n_spaces > 0:
        cont = ctx[-n_spaces:] + cont
        ctx = ctx[:-n_spaces]
    whole = prefix + tok(ctx + cont, add_special_tokens=False).input_ids
    context = prefix + tok(ctx, add_special_tokens=False).input_ids
    return context, whole[len(context):]


def _expected(tok, ex: Example, prefix: list[int] = ()) -> tuple[list[int], list[int]]:
    ctx, cont = _lm_eval_pair(tok, ex.prompt, ex.target, list(prefix))
    if ex.kind == "generation":
        cont = cont + [tok.eos_token_id]
    return ctx, cont


def _row_losses(model, batch) -> torch.Tensor:
    """``[B]`` summed cross-entropy of each row's labelled tokens (the training loss, per example)."""
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits.float()
    return torch.stack([F.cross_entropy(logits[i, :-1], batch.labels[i, 1:], ignore_index=-100, reduction="sum")
                        for i in range(len(logits))])


def test_the_pair_is_split_as_lm_eval_splits_it(lm):
    _, tok = lm
    # separate encoding differs from lm-eval's on this tokenizer: the test can tell them apart
    separate = tok(GEN.prompt).input_ids + tok(GEN.target).input_ids
    ctx, cont = _expected(tok, GEN)
    assert separate != ctx + cont[:-1]
    assert encode_pairs(tok, [(GEN.prompt, GEN.target)]) == [(ctx, cont[:-1])]
    # an empty prompt is the prefix token (no bos here: eos)
    assert encode_pairs(tok, [("", "He had")]) == [([tok.eos_token_id], tok("He had").input_ids)]


@pytest.mark.parametrize("example", [MC_MULTI, MC_SINGLE, GEN], ids=["mc-multi-token", "mc-single-token", "gen"])
def test_training_loss_equals_evaluation_nll(lm, example):
    model, tok = lm
    exs = [example, LONG]                                  # LONG is longer: example's row is padded
    batch = encode(tok, exs)
    n = int(batch.attention_mask[0].sum())
    assert n < batch.input_ids.shape[1] and int(batch.attention_mask[1].sum()) == batch.input_ids.shape[1]

    # token ids: the row is lm-eval's context + continuation, labels exactly on the continuation
    ctx, cont = _expected(tok, example)
    assert batch.input_ids[0, :n].tolist() == ctx + cont
    assert batch.labels[0, :len(ctx)].tolist() == [-100] * len(ctx)
    assert batch.labels[0, len(ctx):n].tolist() == cont and (batch.labels[0, n:] == -100).all()
    # the scorer reads the same tokens and scores the same continuation
    seq, targets = example_requests(tok, exs, max_length=1024)[0]
    assert seq == (ctx + cont)[:-1] and targets == [cont]

    with torch.no_grad():
        train = _row_losses(model, batch)
        al, at = answer_logits(model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits, batch.labels)
        nll, counts = answer_nll(model, tok, exs, batch_size=2)
    assert counts == [len(cont), len(_expected(tok, LONG)[1])]
    assert train[0].item() == pytest.approx(nll[0].item(), abs=1e-4)
    assert train[1].item() == pytest.approx(nll[1].item(), abs=1e-4)
    # the attack's and defense's loss (mean over answer tokens) is the evaluation's task_loss
    with torch.no_grad():
        assert F.cross_entropy(al.float(), at).item() == pytest.approx(
            task_loss(model, tok, exs).item(), abs=1e-4)
    if example.kind == "multiple_choice":
        # multiple-choice accuracy scores the labelled choice with the same log-likelihood
        with torch.no_grad():
            lp = eval_choice_logprobs(model, tok, [example], batch_size=1)
        assert -lp[0, example.label].item() == pytest.approx(train[0].item(), abs=1e-4)


def test_single_token_choices_read_at_the_answer_position(lm):
    model, tok = lm
    batch = encode(tok, [MC_SINGLE, MC_SINGLE])
    assert batch.choice_ids is not None and batch.label.tolist() == [1, 1]
    ctx, _ = _expected(tok, MC_SINGLE)
    assert batch.choice_ids[0].tolist() == [_lm_eval_pair(tok, MC_SINGLE.prompt, c, [])[1][0]
                                            for c in MC_SINGLE.choices]
    with torch.no_grad():
        lp = choice_logprobs(model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits, batch)
        want = eval_choice_logprobs(model, tok, [MC_SINGLE])
    assert torch.allclose(lp[0], want[0], atol=1e-4)
    assert encode(tok, [MC_MULTI]).choice_ids is None       # multi-token choices: no shortcut


def test_perplexity_document_first_token_is_context(lm):
    model, tok = lm
    doc = Example("perplexity", "", " = Robert = \n Robert is an English film , television and theatre actor .")
    batch = encode(tok, [doc, LONG])
    ids = tok(doc.target).input_ids
    assert batch.input_ids[0, :len(ids)].tolist() == ids and batch.labels[0, 0] == -100
    with torch.no_grad():
        nll, counts = answer_nll(model, tok, [doc])
        assert counts == [len(ids) - 1]
        assert _row_losses(model, batch)[0].item() == pytest.approx(nll[0].item(), abs=1e-4)


def test_truncation_keeps_the_same_tokens_in_training_and_scoring(lm):
    model, tok = lm
    exs = [GEN, LONG]
    ctx, cont = _expected(tok, LONG)
    L = len(cont) + 3                                        # the prompt is cut to its last 3 tokens
    batch = encode(tok, exs, max_length=L)
    assert batch.input_ids.shape[1] == L and batch.input_ids[1].tolist() == (ctx + cont)[-L:]
    with torch.no_grad():
        train = _row_losses(model, batch)
        nll, _ = answer_nll(model, tok, exs, max_length=L)
    assert torch.allclose(train, nll, atol=1e-4)


def test_tokenizer_special_tokens_prefix_kept_suffix_dropped():
    from tokenizers import processors

    tok = build_tokenizer()
    eos = tok.eos_token_id
    # a tokenizer that wraps every text as "<eos> text <eos>" (bos-like prefix, eos-like suffix)
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<eos> $A <eos>", special_tokens=[("<eos>", eos)])
    assert tok("He had").input_ids[0] == eos and tok("He had").input_ids[-1] == eos
    model = build_model(tok)
    batch = encode(tok, [GEN, LONG])
    ctx, cont = _expected(tok, GEN, prefix=[eos])
    n = int(batch.attention_mask[0].sum())
    assert batch.input_ids[0, :n].tolist() == ctx + cont
    with torch.no_grad():
        nll, _ = answer_nll(model, tok, [GEN, LONG])
        assert torch.allclose(_row_losses(model, batch), nll, atol=1e-4)
