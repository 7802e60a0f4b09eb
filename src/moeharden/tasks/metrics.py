"""The one scorer: metrics and losses of a Hugging Face causal LM on a task's examples.

Every example is tokenized by :mod:`moeharden.tasks.encoding` (lm-evaluation-harness's request
semantics), and every log-likelihood here comes from :func:`score_requests`, so the attack's and
the defense's training losses, attribution's ablation loss and evaluation agree token for token.
Scan evaluates one loaded model under many expert masks, so every metric batches its work:

* multiple choice: the log-likelihood of each choice after the prompt, summed over the choice's
  tokens (lm-evaluation-harness's ``acc``: unnormalised sum). When every choice of an example is a
  single token, one forward over the prompt scores all of them;
* perplexity: sliding windows over each document; every token after the first is scored once,
  with up to ``window - 1`` tokens of context (Hugging Face's perplexity guide); windows of all
  documents are batched together;
* generation: greedy decoding with a KV cache, stopping at eos or a stop string; exact match and
  ROUGE (:mod:`moeharden.tasks.rouge`);
* answer losses (:func:`answer_nll`, :func:`task_loss`): the summed negative log-likelihood of each
  example's answer tokens, differentiable.

All scoring uses left padding with explicit ``position_ids`` (so a padded row sees the same
positions as unpadded) and asks the model for the last few positions' logits only.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from typing import Any

import torch

from moeharden.errors import TaskError
from moeharden.tasks.encoding import (
    Request,
    choice_request,
    encode_pairs,
    encode_texts,
    example_requests,
    pad_token_id,
    prefix_token_id,
    request,
)
from moeharden.tasks.examples import EvalResult, Example, Task
from moeharden.tasks.intervals import mean_interval, perplexity_interval, wilson
from moeharden.tasks.rouge import ROUGE_KEYS, rouge_impl, rouge_scores

DEFAULT_MAX_LENGTH = 2048


def normalized_perplexity(ppl: float, full_ppl: float) -> float:
    """Perplexity relative to the full model's, full model = 100 (the paper's tables)."""
    return 100.0 * ppl / full_ppl


# --------------------------------------------------------------------------- plumbing
def _device(model) -> torch.device:
    return getattr(model, "device", None) or next(model.parameters()).device


def model_max_length(model, cap: int | None = None) -> int:
    """Longest sequence the model takes: its position limit, then ``cap``, else 2048."""
    cfg = getattr(model, "config", None)
    n = None
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        n = n or getattr(cfg, key, None)
    n = int(n or DEFAULT_MAX_LENGTH)
    return min(n, cap) if cap else n


def _left_pad(seqs: Sequence[Sequence[int]], pad_id: int, device) -> tuple[torch.Tensor, ...]:
    """``ids, attention_mask, position_ids``, each ``[B, L]``; real tokens at positions 0..n-1."""
    L = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), L), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), L), dtype=torch.long)
    for i, s in enumerate(seqs):
        if s:
            ids[i, L - len(s):] = torch.tensor(s, dtype=torch.long)
            mask[i, L - len(s):] = 1
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    return ids.to(device), mask.to(device), pos.to(device)


def _keeps_logits(model) -> bool:
    try:
        return "logits_to_keep" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):  # pragma: no cover
        return False


def _tail_logits(model, ids, mask, pos, k: int) -> torch.Tensor:
    """Logits at the last ``k`` positions, ``[B, k, V]`` (only those are computed when the model allows)."""
    kw = {"logits_to_keep": k} if _keeps_logits(model) else {}
    logits = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False, **kw).logits
    return logits[:, -k:]


@contextmanager
def _eval_mode(model):
    was = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was)


def score_requests(model, requests: Sequence[Request], *, pad_id: int, batch_size: int = 32,
                   progress: Callable[[int], None] | None = None) -> list[torch.Tensor]:
    """Summed log-probabilities of each request's continuations, ``[m]`` per request.

    Longest requests are batched first (lm-eval's order) and the results are put back in input
    order. Differentiable when called with gradients enabled.

    Args:
        requests: see :data:`moeharden.tasks.encoding.Request`.
        pad_id: the id left padding uses (never attended).
        progress: called with the number of requests after each batch.
    Returns:
        One ``[m]`` tensor per request (m alternative continuations).
    """
    device = _device(model)
    order = sorted(range(len(requests)), key=lambda i: -len(requests[i][0]))
    out: list[torch.Tensor | None] = [None] * len(requests)
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        ids, mask, pos = _left_pad([requests[i][0] for i in idx], pad_id, device)
        k = max(len(requests[i][1][0]) for i in idx)
        logits = _tail_logits(model, ids, mask, pos, k)  # [B, k, V]
        for row, i in enumerate(idx):
            tg = torch.tensor(requests[i][1], dtype=torch.long, device=device)  # [m, n]
            n = tg.shape[1]
            # one row at a time in float32, so a large vocabulary never needs a [B, k, V] float copy
            lg = logits[row, k - n:].float()  # [n, V]
            # [n, m] token log-probs = gathered logits - log-partition, summed over the n tokens
            out[i] = (lg.gather(-1, tg.T) - torch.logsumexp(lg, -1, keepdim=True)).sum(0)
        if progress is not None:
            progress(len(idx))
    return out  # type: ignore[return-value]


# --------------------------------------------------------------------------- multiple choice
def choice_logprobs(model, tokenizer, examples: Sequence[Example], *, batch_size: int = 32,
                    max_length: int | None = None) -> torch.Tensor:
    """Log-likelihood of every choice after its prompt, ``[N, C]`` (``-inf`` pads ragged choices).

    Examples whose choices are all one token long take one request (one forward row) for all
    choices; the others take one request per choice.
    """
    max_length = model_max_length(model, max_length)
    requests: list[Request] = []
    owner: list[tuple[int, list[int]]] = []  # (example, choice ids) of each request
    flat = encode_pairs(tokenizer, [(ex.prompt, c) for ex in examples for c in ex.choices])  # one tokenizer call
    start = 0
    for i, ex in enumerate(examples):
        enc, start = flat[start:start + len(ex.choices)], start + len(ex.choices)
        if all(len(cont) == 1 for _, cont in enc):
            requests.append(choice_request(enc[0][0], [cont for _, cont in enc], max_length))
            owner.append((i, list(range(len(enc)))))
        else:
            for j, (ctx, cont) in enumerate(enc):
                requests.append(request(ctx, cont, max_length))
                owner.append((i, [j]))
    scores = score_requests(model, requests, pad_id=pad_token_id(tokenizer), batch_size=batch_size)
    C = max((len(ex.choices) for ex in examples), default=0)
    out = torch.full((len(examples), C), float("-inf"))
    for (i, js), s in zip(owner, scores, strict=True):
        out[i, js] = s.detach().float().cpu()
    return out


def multiple_choice_accuracy(model, tokenizer, examples: Sequence[Example], *, batch_size: int = 32,
                             max_length: int | None = None) -> tuple[float, torch.Tensor]:
    """Share of examples whose labelled choice has the highest log-likelihood; also the ``[N, C]`` scores."""
    lp = choice_logprobs(model, tokenizer, examples, batch_size=batch_size, max_length=max_length)
    labels = torch.tensor([ex.label for ex in examples])
    return int((lp.argmax(-1) == labels).sum()) / max(1, len(examples)), lp


# --------------------------------------------------------------------------- perplexity
def perplexity_windows(n_tokens: int, window: int, stride: int) -> list[tuple[int, int, int]]:
    """Sliding windows over one document of ``n_tokens``: ``(begin, end, n_scored)`` each.

    The model reads tokens ``[begin, end - 1)`` and the last ``n_scored`` tokens of ``[begin, end)``
    are scored; together the windows score tokens ``1..n_tokens-1`` once each, every token with
    at least ``window - stride`` tokens of context (all earlier ones in the first window).
    """
    if not 1 <= stride < window:
        raise TaskError(f"Perplexity needs 1 <= stride < window (got stride {stride}, window {window}).")
    if n_tokens < 2:
        return []
    end = min(window, n_tokens)
    out = [(0, end, end - 1)]
    while end < n_tokens:
        new_end = min(end + stride, n_tokens)
        out.append((new_end - window, new_end, new_end - end))
        end = new_end
    return out


def perplexity(model, tokenizer, texts: Sequence[str], *, window: int | None = None, stride: int | None = None,
               batch_size: int = 8) -> dict[str, float]:
    """Token-level perplexity of ``texts`` (each its own document) with a sliding window.

    Args:
        window: tokens per forward (default: the model's position limit, at most 2048).
        stride: new tokens scored per window (default ``window // 2``).
    Returns:
        ``{"perplexity", "nll" (summed, nats), "tokens" (scored), "docs"}``; ``docs`` lists
        ``(summed nll, tokens scored)`` of every document with a token to score, in input order
        (what :func:`moeharden.tasks.intervals.perplexity_interval` resamples).
    Raises:
        TaskError: no document has 2 tokens, or an invalid window/stride.
    """
    window = window or model_max_length(model, DEFAULT_MAX_LENGTH)
    window = min(window, model_max_length(model) + 1)  # reads window - 1 tokens
    stride = stride or max(1, window // 2)
    stride = min(stride, window - 1)
    requests: list[Request] = []
    doc_of: list[int] = []  # the document each window belongs to
    for d, ids in enumerate(encode_texts(tokenizer, texts)):
        for begin, end, n in perplexity_windows(len(ids), window, stride):
            requests.append((ids[begin:end - 1], [ids[end - n:end]]))
            doc_of.append(d)
    if not requests:
        raise TaskError("Perplexity needs documents of at least 2 tokens; every document is shorter.")
    with torch.no_grad():
        scores = score_requests(model, requests, pad_id=pad_token_id(tokenizer), batch_size=batch_size)
    per_doc: dict[int, list[float]] = {}  # document -> [summed nll, tokens]
    for d, r, sc in zip(doc_of, requests, scores, strict=True):
        acc = per_doc.setdefault(d, [0.0, 0])
        acc[0] -= float(sc.sum())
        acc[1] += len(r[1][0])
    docs = [(nll_d, int(t)) for nll_d, t in (per_doc[d] for d in sorted(per_doc))]
    nll = sum(x for x, _ in docs)
    tokens = sum(t for _, t in docs)
    return {"perplexity": math.exp(nll / tokens), "nll": nll, "tokens": tokens, "docs": docs}


# --------------------------------------------------------------------------- generation
@torch.no_grad()
def generate_greedy(model, tokenizer, prompts: Sequence[str], *, max_new_tokens: int = 32,
                    stop: Sequence[str] = ("\n",), batch_size: int = 16, max_length: int | None = None) -> list[str]:
    """Greedy continuations of ``prompts``, cut at eos or the first stop string.

    Prompts longer than ``max_length - max_new_tokens`` tokens are cut from the left.
    """
    device = _device(model)
    eos = tokenizer.eos_token_id
    budget = max(1, model_max_length(model, max_length) - max_new_tokens)
    enc = [ids[-budget:] or [prefix_token_id(tokenizer)] for ids in encode_texts(tokenizer, prompts)]
    order = sorted(range(len(enc)), key=lambda i: -len(enc[i]))
    cache_arg = _cache_arg(model)
    texts: list[str] = [""] * len(enc)
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        ids, mask, pos = _left_pad([enc[i] for i in idx], pad_token_id(tokenizer), device)
        kw = {"logits_to_keep": 1} if _keeps_logits(model) else {}
        out = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, **kw)
        new = [[] for _ in idx]
        done = torch.zeros(len(idx), dtype=torch.bool)
        for step in range(max_new_tokens):
            nxt = out.logits[:, -1].argmax(-1)  # [B]
            for r, t in enumerate(nxt.tolist()):
                if done[r]:
                    continue
                if eos is not None and t == eos:
                    done[r] = True
                    continue
                new[r].append(t)
                if stop and any(s in tokenizer.decode(new[r], skip_special_tokens=True) for s in stop):
                    done[r] = True
            if bool(done.all()) or step == max_new_tokens - 1:
                break
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            pos = pos[:, -1:] + 1
            cache = out.past_key_values if getattr(out, "cache", None) is None else out.cache
            out = model(input_ids=nxt[:, None], attention_mask=mask, position_ids=pos, use_cache=True,
                        **{cache_arg: cache})
        for r, i in enumerate(idx):
            text = tokenizer.decode(new[r], skip_special_tokens=True)
            cuts = [text.find(s) for s in stop if s and s in text]
            texts[i] = text[:min(cuts)] if cuts else text
    return texts


def _cache_arg(model) -> str:
    """The name the model's forward takes its key/value cache by: ``cache`` where the installed
    transformers has renamed ``past_key_values`` (5.24 and later: the old name is deprecated and
    goes in 5.40), ``past_key_values`` where it has not."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


# --------------------------------------------------------------------------- tasks
def evaluate(model, tokenizer, task: Task, *, split: str = "evaluation", batch_size: int = 32,
             examples: Sequence[Example] | None = None) -> EvalResult:
    """The task's metric on one split of a loaded (possibly masked) model.

    Args:
        split: ``evaluation`` (default), ``attribution`` or ``train``.
        examples: score these instead of a split.
    Returns:
        An :class:`EvalResult` with its 95% interval ``lo``/``hi``: Wilson on the number correct
        for accuracy and exact match, a bootstrap over examples for ROUGE and over documents for
        perplexity (generation: all ROUGE scores and exact match in ``extra``).
    Raises:
        TaskError: the split is empty, or the task is of an unknown kind.
    """
    if task.kind == "lm_eval":
        from moeharden.tasks.lmeval import evaluate_lm_eval

        return evaluate_lm_eval(model, tokenizer, task, split=split, batch_size=batch_size)
    exs = list(examples) if examples is not None else list(getattr(task, split))
    if not exs:
        raise TaskError(f"Task {task.name!r} has no {split} examples to evaluate.")
    spec = task.spec
    max_length = spec.max_length if spec is not None else None
    with _eval_mode(model), torch.no_grad():
        if task.kind == "multiple_choice":
            acc, lp = multiple_choice_accuracy(model, tokenizer, exs, batch_size=batch_size, max_length=max_length)
            correct = int((lp.argmax(-1) == torch.tensor([ex.label for ex in exs])).sum())
            return EvalResult(task.name, task.metric, acc, len(exs), {}, *wilson(correct, len(exs)))
        if task.kind == "perplexity":
            r = perplexity(model, tokenizer, [ex.target for ex in exs], window=spec.window if spec else None,
                           stride=spec.stride if spec else None, batch_size=max(1, batch_size // 8))
            return EvalResult(task.name, task.metric, r["perplexity"], len(exs),
                              {"nll": r["nll"], "tokens": r["tokens"]}, *perplexity_interval(r["docs"]))
        if task.kind == "generation":
            preds = generate_greedy(model, tokenizer, [ex.prompt for ex in exs],
                                    max_new_tokens=spec.max_new_tokens if spec else 32,
                                    stop=tuple(spec.stop) if spec else ("\n",), batch_size=batch_size,
                                    max_length=max_length)
            hits = sum(p.strip() == ex.target.strip() for p, ex in zip(preds, exs, strict=True))
            extra: dict[str, Any] = {"exact_match": hits / len(exs)}
            lo, hi = wilson(hits, len(exs))
            if task.metric.startswith("rouge"):
                rs = [rouge_scores(p, ex.target) for p, ex in zip(preds, exs, strict=True)]
                extra.update({k: sum(r[k] for r in rs) / len(rs) for k in ROUGE_KEYS})
                extra["rouge_impl"] = rouge_impl()
                if task.metric in ROUGE_KEYS:  # a bootstrap over the per-example F1 scores
                    lo, hi = mean_interval([r[task.metric] for r in rs])
            return EvalResult(task.name, task.metric, float(extra[task.metric]), len(exs), extra, lo, hi)
    raise TaskError(f"Task {task.name!r} has unknown kind {task.kind!r}.")


# --------------------------------------------------------------------------- answer losses
def answer_nll(model, tokenizer, examples: Sequence[Example], *, batch_size: int = 16,
               max_length: int | None = None) -> tuple[torch.Tensor, list[int]]:
    """Summed negative log-likelihood of each example's answer tokens, and how many there are.

    The answer is what :func:`moeharden.tasks.encoding.example_pairs` scores: the labelled choice,
    the target followed by eos, or a document's tokens after its first. It equals the summed
    cross-entropy of the example's row in an :func:`moeharden.tasks.encoding.encode` batch.

    Args:
        max_length: tokens of prompt + answer (default: the model's position limit).
    Returns:
        ``(nll [N], n_tokens)``; an example with no token to score has nll 0 and 0 tokens.
        Differentiable when called with gradients enabled.
    """
    max_length = model_max_length(model, max_length)
    reqs = example_requests(tokenizer, examples, max_length=max_length)
    live = [i for i, r in enumerate(reqs) if r is not None]
    scores = score_requests(model, [reqs[i] for i in live], pad_id=pad_token_id(tokenizer), batch_size=batch_size)
    nll = torch.zeros(len(examples), device=_device(model))
    if live:
        nll = nll.index_put((torch.tensor(live, device=nll.device),), -torch.cat(scores))
    return nll, [len(r[1][0]) if r is not None else 0 for r in reqs]


def task_loss(model, tokenizer, examples: Sequence[Example], *, batch_size: int = 16,
              max_length: int | None = None) -> torch.Tensor:
    """Mean token negative log-likelihood of the examples' correct answers (differentiable).

    Multiple choice: the labelled choice after the prompt; generation: the target followed by eos
    (as the model should stop); perplexity: the document's tokens after its first (documents are
    cut to ``max_length`` tokens). Runs with gradients when the caller has them enabled; wrap in
    ``torch.no_grad()`` when only the value is needed (e.g. ablation attribution).

    Returns:
        A scalar tensor (token-weighted mean over all examples).
    Raises:
        TaskError: no examples, or none with a token to score.
    """
    if not examples:
        raise TaskError("task_loss needs at least one example.")
    nll, counts = answer_nll(model, tokenizer, examples, batch_size=batch_size, max_length=max_length)
    if not sum(counts):
        raise TaskError("task_loss: no example has an answer token to score.")
    return nll.sum() / sum(counts)
