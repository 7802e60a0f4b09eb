"""The one encoding: examples to token ids, as training batches and as scoring requests.

Evaluation, attribution losses, the re-alignment attack, the entangling defense and demo training
all tokenize an example here, so that what a model is trained on is exactly what it is judged on.

A (context, continuation) pair is split as lm-evaluation-harness splits a ``loglikelihood``
request (``HFLM._encode_pair``):

* trailing whitespace of the context moves onto the continuation;
* context + continuation is encoded whole, and the continuation is the tail beyond the length of
  the context's own encoding, so word pieces merged across the boundary stay as the model sees them;
* an empty context becomes one prefix token (bos, else eos), as lm-eval's ``prefix_token_id``.

Special tokens follow the model's tokenizer: text gets the tokens the tokenizer puts *before* it
(bos for Llama/Mixtral tokenizers, nothing for GPT-2 style ones), never tokens it would append
after (an appended eos would sit inside the whole encoding). lm-eval's HFLM adds bos only when
asked (``add_bos_token``); moeharden always encodes as the model's tokenizer does.

Per kind (:func:`example_pairs`): ``multiple_choice`` scores the labelled choice after the prompt;
``generation`` the target followed by eos (the model should also stop); ``perplexity`` a document's
tokens after its first (documents are cut to their first ``max_length`` tokens).

An example longer than ``max_length`` tokens keeps its last ``max_length`` (the prompt is cut from
the left; an answer longer than that keeps its end). The model reads all of them but the last, and
the answer tokens among them are scored (:func:`fit`). Training batches (:func:`encode`) are
right-padded with ``labels = -100`` outside answer tokens, so that a plain forward without
``position_ids`` sees every row as unpadded; scoring requests (:data:`Request`) are left-padded by
:func:`moeharden.tasks.metrics.score_requests`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from moeharden.errors import TaskError

# A scoring request: the model reads ``seq``; ``targets`` [m, n] are m alternative continuations of
# n tokens each, scored at the last n positions (m > 1 only for single-token choices, n == 1).
Request = tuple[list[int], list[list[int]]]

DEFAULT_TRAIN_LENGTH = 1024


# --------------------------------------------------------------------------- token ids
def pad_token_id(tokenizer) -> int:
    """The id padding uses: pad, else eos, else 0 (padded positions are never attended or scored)."""
    for tid in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0):
        if tid is not None:
            return int(tid)
    return 0  # pragma: no cover


def prefix_token_id(tokenizer) -> int:
    """The context of a continuation with no prompt (lm-eval's prefix token): bos, else eos, else pad.

    Raises:
        TaskError: the tokenizer has none of the three.
    """
    for tid in (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id):
        if tid is not None:
            return int(tid)
    raise TaskError("The tokenizer has no bos, eos or pad token to start an empty prompt with.")


def special_prefix(tokenizer) -> list[int]:
    """The special tokens the tokenizer puts before any text (``[bos]`` or ``[]``)."""
    with_sp = list(tokenizer("a", add_special_tokens=True)["input_ids"])
    plain = list(tokenizer("a", add_special_tokens=False)["input_ids"])
    for i in range(len(with_sp) - len(plain) + 1):
        if with_sp[i:i + len(plain)] == plain:
            return with_sp[:i]
    bos = tokenizer.bos_token_id
    return [int(bos)] if bos is not None and with_sp[:1] == [bos] else []


def encode_texts(tokenizer, texts: Sequence[str]) -> list[list[int]]:
    """Token ids of each text, with the tokenizer's leading special tokens (see the module docstring)."""
    if not texts:
        return []
    prefix = special_prefix(tokenizer)
    return [prefix + list(x) for x in tokenizer(list(texts), add_special_tokens=False)["input_ids"]]


def encode_pairs(tokenizer, pairs: Sequence[tuple[str, str]]) -> list[tuple[list[int], list[int]]]:
    """Token ids of (context, continuation) pairs, split as lm-evaluation-harness does.

    Args:
        tokenizer: the model's tokenizer.
        pairs: ``(context, continuation)`` strings.
    Returns:
        ``(context ids, continuation ids)`` per pair; an empty context is ``[prefix token]``.
    Raises:
        TaskError: an empty context and a tokenizer without bos, eos or pad token.
    """
    ctxs, wholes = [], []
    for ctx, cont in pairs:
        n_ws = len(ctx) - len(ctx.rstrip())
        if n_ws:
            ctx, cont = ctx[:-n_ws], ctx[-n_ws:] + cont
        ctxs.append(ctx)
        wholes.append(ctx + cont)
    out = []
    for c, w in zip(encode_texts(tokenizer, ctxs), encode_texts(tokenizer, wholes), strict=True):
        out.append((c if c else [prefix_token_id(tokenizer)], w[len(c):]))
    return out


def example_pairs(tokenizer, examples: Sequence, *, max_length: int) -> list[tuple[list[int], list[int]]]:
    """``(context ids, answer ids)`` of each example: what is read before the answer, and what is scored.

    Args:
        tokenizer: the model's tokenizer.
        examples: :class:`moeharden.tasks.examples.Example` objects (``kind``, ``prompt``, ``target``).
        max_length: perplexity documents are cut to their first ``max_length`` tokens.
    Returns:
        One pair per example, in order (see the module docstring for each kind).
    """
    out: list[tuple[list[int], list[int]] | None] = [None] * len(examples)
    docs = [i for i, ex in enumerate(examples) if getattr(ex, "kind", "") == "perplexity"]
    for i, ids in zip(docs, encode_texts(tokenizer, [examples[i].target for i in docs]), strict=True):
        ids = ids[:max_length]
        out[i] = (ids[:1], ids[1:])      # the first token has no context: never scored
    rest = [i for i in range(len(examples)) if out[i] is None]
    eos = tokenizer.eos_token_id
    enc = encode_pairs(tokenizer, [(examples[i].prompt, examples[i].target) for i in rest])
    for i, (ctx, cont) in zip(rest, enc, strict=True):
        if getattr(examples[i], "kind", "") == "generation" and eos is not None:
            cont = cont + [int(eos)]      # the model should also learn, and be scored, to stop
        out[i] = (ctx, cont)
    return out  # type: ignore[return-value]


def fit(ctx: Sequence[int], cont: Sequence[int], max_length: int) -> tuple[list[int], int]:
    """Cut one example to ``max_length`` tokens: ``(ids, first)``, answer tokens scored = ``ids[first:]``.

    ``ids`` is the last ``max_length`` tokens of context + answer; ``ids[0]`` is never scored
    (nothing predicts it).
    """
    ids = (list(ctx) + list(cont))[-max_length:]
    return ids, max(len(ids) - len(cont), 1)


def request(ctx: Sequence[int], cont: Sequence[int], max_length: int) -> Request:
    """The scoring request of one (context, answer) pair, cut as :func:`fit` cuts it."""
    ids, first = fit(ctx, cont, max_length)
    return ids[:-1], [ids[first:]]


def choice_request(ctx: Sequence[int], choices: Sequence[Sequence[int]], max_length: int) -> Request:
    """One request scoring several single-token continuations of ``ctx`` at once (``[[c0], [c1], ...]``)."""
    return list(ctx)[-(max_length - 1):], [list(c) for c in choices]


def example_requests(tokenizer, examples: Sequence, *, max_length: int) -> list[Request | None]:
    """The scoring request of each example's answer (``None`` when it has no token to score)."""
    out: list[Request | None] = []
    for ctx, cont in example_pairs(tokenizer, examples, max_length=max_length):
        seq, targets = request(ctx, cont, max_length)
        out.append((seq, targets) if targets[0] else None)
    return out


# --------------------------------------------------------------------------- training batches
@dataclass
class LMBatch:
    """``input_ids``/``attention_mask``/``labels``: ``[B, T]``; ``choice_ids``: ``[B, C]`` token of
    each choice (multiple choice with single-token choices) or None; ``label``: ``[B]`` or None."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor
    choice_ids: torch.Tensor | None = None
    label: torch.Tensor | None = None

    def to(self, device) -> LMBatch:
        """The batch on ``device``."""
        mv = lambda t: None if t is None else t.to(device)  # noqa: E731
        return LMBatch(mv(self.input_ids), mv(self.attention_mask), mv(self.labels), mv(self.choice_ids),
                       mv(self.label))


def _choice_tokens(tokenizer, ex) -> list[int] | None:
    """The token of each of ``ex``'s choices when every choice is one token after its prompt, else None."""
    if not getattr(ex, "choices", ()):
        return None
    conts = [cont for _, cont in encode_pairs(tokenizer, [(ex.prompt, c) for c in ex.choices])]
    return [c[0] for c in conts] if all(len(c) == 1 for c in conts) else None


def _assemble(tokenizer, examples: Sequence, rows: Sequence[tuple[list[int], int]],
              choices: Sequence[list[int] | None]) -> LMBatch:
    """A right-padded batch from each example's cut ids (:func:`fit`) and its single-token choices."""
    T = max((len(ids) for ids, _ in rows), default=0)
    input_ids = torch.full((len(rows), T), pad_token_id(tokenizer), dtype=torch.long)
    attn = torch.zeros((len(rows), T), dtype=torch.long)
    labels = torch.full((len(rows), T), -100, dtype=torch.long)
    for i, (ids, first) in enumerate(rows):
        input_ids[i, :len(ids)] = torch.tensor(ids, dtype=torch.long)
        attn[i, :len(ids)] = 1
        labels[i, first:len(ids)] = torch.tensor(ids[first:], dtype=torch.long)
    choice_ids = label = None
    if choices and all(c is not None for c in choices) and len({len(c) for c in choices}) == 1:
        choice_ids = torch.tensor(list(choices), dtype=torch.long)
        label = torch.tensor([ex.label for ex in examples], dtype=torch.long)
    return LMBatch(input_ids, attn, labels, choice_ids, label)


def encode(tokenizer, examples: Sequence, *, max_length: int = DEFAULT_TRAIN_LENGTH) -> LMBatch:
    """Encode examples into a right-padded training batch; ``labels`` are -100 outside answer tokens.

    Args:
        tokenizer: the model's tokenizer.
        examples: :class:`moeharden.tasks.examples.Example` objects.
        max_length: tokens per row; longer examples keep their last ``max_length`` (see :func:`fit`).
    Returns:
        An :class:`LMBatch`; the summed cross-entropy of a row's answer tokens is the negative
        log-likelihood :func:`moeharden.tasks.metrics.answer_nll` scores for the same example.
        ``choice_ids``/``label`` are set when every example has the same number of choices and each
        choice is one token.
    """
    rows = [fit(ctx, cont, max_length) for ctx, cont in example_pairs(tokenizer, examples, max_length=max_length)]
    return _assemble(tokenizer, examples, rows, [_choice_tokens(tokenizer, ex) for ex in examples])


class BatchEncoder:
    """:func:`encode` with each example's token ids computed once: the attack and the defense encode
    the same few hundred examples thousands of times. Examples are keyed by value (they are frozen).
    Gives the same batches as :func:`encode`."""

    def __init__(self, tokenizer, *, max_length: int = DEFAULT_TRAIN_LENGTH):
        self.tokenizer, self.max_length = tokenizer, max_length
        self._rows: dict = {}

    def __call__(self, examples: Sequence) -> LMBatch:
        todo = list(dict.fromkeys(ex for ex in examples if ex not in self._rows))
        if todo:
            pairs = example_pairs(self.tokenizer, todo, max_length=self.max_length)
            for ex, (ctx, cont) in zip(todo, pairs, strict=True):
                self._rows[ex] = (fit(ctx, cont, self.max_length), _choice_tokens(self.tokenizer, ex))
        got = [self._rows[ex] for ex in examples]
        return _assemble(self.tokenizer, examples, [r for r, _ in got], [c for _, c in got])


def answer_logits(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits predicting each answer token and those tokens: ``([N, V], [N])``, N = answer tokens."""
    shift_logits = logits[:, :-1]       # [B, T-1, V]: position t predicts token t + 1
    shift_labels = labels[:, 1:]        # [B, T-1]
    sel = shift_labels != -100
    return shift_logits[sel], shift_labels[sel]


def first_answer_position(labels: torch.Tensor) -> torch.Tensor:
    """``[B]`` index of the position whose logits predict each row's first answer token."""
    is_ans = (labels != -100).long()
    first = is_ans.argmax(1)          # [B] first answer token position
    return (first - 1).clamp(min=0)


def choice_logprobs(logits: torch.Tensor, batch: LMBatch) -> torch.Tensor:
    """``[B, C]`` log-probabilities of single-token choices at the answer position (needs choice_ids)."""
    pos = first_answer_position(batch.labels)
    rows = logits[torch.arange(logits.shape[0]), pos]          # [B, V]
    return torch.log_softmax(rows.float(), -1).gather(1, batch.choice_ids)
