"""Turn task examples into training batches: prompt + answer, with the loss on answer tokens only.

Context and continuation are tokenized separately and concatenated (as lm-evaluation-harness
does), so the answer's tokens are exactly those of the continuation whatever the tokenizer merges.
Right padding; ``labels`` is -100 outside answer tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass
class LMBatch:
    """``input_ids``/``attention_mask``/``labels``: ``[B, T]``; ``choice_ids``: ``[B, C]`` first token of
    each choice (multiple choice with single-token choices) or None; ``label``: ``[B]`` or None."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor
    choice_ids: torch.Tensor | None = None
    label: torch.Tensor | None = None

    def to(self, device) -> LMBatch:
        mv = lambda t: None if t is None else t.to(device)  # noqa: E731
        return LMBatch(mv(self.input_ids), mv(self.attention_mask), mv(self.labels), mv(self.choice_ids),
                       mv(self.label))


def _ids(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"]) if text else []


def encode(tokenizer, examples: Sequence, *, max_length: int = 1024) -> LMBatch:
    """Encode examples (``prompt``, ``target``, optional ``choices``/``label``) into an :class:`LMBatch`.

    Prompts are left-truncated when prompt + answer exceeds ``max_length``.
    """
    seqs, labs = [], []
    for ex in examples:
        ctx, cont = _ids(tokenizer, ex.prompt), _ids(tokenizer, ex.target)
        if getattr(ex, "kind", "") == "generation" and tokenizer.eos_token_id is not None:
            cont = cont + [int(tokenizer.eos_token_id)]   # the model should also learn to stop
        if tokenizer.bos_token_id is not None and getattr(tokenizer, "add_bos_token", False):
            ctx = [tokenizer.bos_token_id] + ctx
        ids = (ctx + cont)[-max_length:]
        n_ctx = max(len(ids) - len(cont), 0)
        seqs.append(ids)
        labs.append([-100] * n_ctx + ids[n_ctx:])
    T = max(len(s) for s in seqs)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    input_ids = torch.full((len(seqs), T), pad, dtype=torch.long)
    attn = torch.zeros((len(seqs), T), dtype=torch.long)
    labels = torch.full((len(seqs), T), -100, dtype=torch.long)
    for i, (s, lab) in enumerate(zip(seqs, labs, strict=True)):
        input_ids[i, :len(s)] = torch.tensor(s)
        attn[i, :len(s)] = 1
        labels[i, :len(s)] = torch.tensor(lab)
    choice_ids = label = None
    if examples and all(getattr(ex, "choices", ()) for ex in examples):
        firsts = [[(_ids(tokenizer, c) or [pad])[0] for c in ex.choices] for ex in examples]
        single = all(len(_ids(tokenizer, c)) == 1 for ex in examples for c in ex.choices)
        if single and len({len(f) for f in firsts}) == 1:
            choice_ids = torch.tensor(firsts, dtype=torch.long)
            label = torch.tensor([ex.label for ex in examples], dtype=torch.long)
    return LMBatch(input_ids, attn, labels, choice_ids, label)


def answer_logits(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits predicting each answer token and those tokens: ``([N, V], [N])``, N = answer tokens."""
    shift_logits = logits[:, :-1]
    shift_labels = labels[:, 1:]
    sel = shift_labels != -100
    return shift_logits[sel], shift_labels[sel]


def first_answer_position(labels: torch.Tensor) -> torch.Tensor:
    """``[B]`` index of the position whose logits predict each row's first answer token."""
    is_ans = (labels != -100).long()
    first = is_ans.argmax(1)          # first answer token position
    return (first - 1).clamp(min=0)


def choice_logprobs(logits: torch.Tensor, batch: LMBatch) -> torch.Tensor:
    """``[B, C]`` log-probabilities of single-token choices at the answer position (needs choice_ids)."""
    pos = first_answer_position(batch.labels)
    rows = logits[torch.arange(logits.shape[0]), pos]          # [B, V]
    return torch.log_softmax(rows.float(), -1).gather(1, batch.choice_ids)
