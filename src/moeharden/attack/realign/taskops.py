"""What the re-alignment loop needs from a task: loss, metric, uncertainty, embeddings, distillation.

Examples are encoded and scored with :mod:`moeharden.tasks.encoding` (the training encoding)
and evaluated with :mod:`moeharden.tasks.metrics`, so the attack trains on what it is judged on.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import torch

from moeharden.attack.realign.selection import entropy_scores, margin_scores
from moeharden.tasks.encoding import BatchEncoder, answer_logits, encode


def _device(model) -> torch.device:
    return next(model.parameters()).device


class TaskOps:
    """One task's operations over example lists, for :func:`moeharden.attack.realign.run.run_recovery`.

    Args:
        tokenizer: the model's tokenizer.
        task: a loaded :class:`moeharden.tasks.examples.Task`.
        batch_size: examples per forward pass in evaluation, embedding and scoring.
    """

    def __init__(self, tokenizer, task, *, batch_size: int = 32):
        self.tokenizer, self.task, self.batch_size = tokenizer, task, batch_size
        self._encode = BatchEncoder(tokenizer)     # training batches: each example tokenized once

    @property
    def has_uncertainty(self) -> bool:
        """Whether :meth:`uncertainty` is defined (multiple choice and generation; not perplexity)."""
        return self.task.kind in ("multiple_choice", "generation")

    def loss(self, model, examples: Sequence) -> torch.Tensor:
        """Differentiable mean cross-entropy of the correct answers' tokens (reads the labels)."""
        b = self._encode(examples).to(_device(model))
        logits = model(input_ids=b.input_ids, attention_mask=b.attention_mask).logits
        al, at = answer_logits(logits, b.labels)
        return torch.nn.functional.cross_entropy(al.float(), at)

    def metric(self, model) -> float:
        """The task's metric on its evaluation split."""
        from moeharden.tasks.metrics import evaluate

        return evaluate(model, self.tokenizer, self.task, batch_size=self.batch_size).value

    @torch.no_grad()
    def embed(self, model, examples: Sequence) -> torch.Tensor:
        """Mean-pooled last hidden states of the prompts, ``[N, H]`` (for k-center selection)."""
        out = []
        for i in range(0, len(examples), self.batch_size):
            chunk = examples[i:i + self.batch_size]
            enc = self.tokenizer([ex.prompt for ex in chunk], return_tensors="pt", padding=True)
            enc = {k: v.to(_device(model)) for k, v in enc.items() if k in ("input_ids", "attention_mask")}
            h = model(**enc, output_hidden_states=True).hidden_states[-1]          # [B, T, H]
            m = enc["attention_mask"].unsqueeze(-1).float()
            out.append(((h * m).sum(1) / m.sum(1).clamp(min=1)).float().cpu())   # [B, H] mean-pooled
        return torch.cat(out)

    def _greedy_answers(self, model, examples: Sequence) -> list[str]:
        from moeharden.tasks.metrics import generate_greedy

        spec = self.task.spec
        return generate_greedy(model, self.tokenizer, [ex.prompt for ex in examples],
                               max_new_tokens=spec.max_new_tokens if spec else 32,
                               stop=tuple(spec.stop) if spec else ("\n",), batch_size=self.batch_size)

    def uncertainty(self, model, examples: Sequence) -> tuple[torch.Tensor, torch.Tensor]:
        """``(entropy [N], margin [N])``, higher = more uncertain; needs no label.

        Multiple choice: over the choices. Generation: over the model's own greedy answer tokens
        (mean token entropy, and the negative smallest top-1/top-2 gap).
        """
        from moeharden.tasks.metrics import choice_logprobs

        bs = self.batch_size
        if self.task.kind == "multiple_choice":
            lp = choice_logprobs(model, self.tokenizer, examples, batch_size=bs)
            return entropy_scores(lp), margin_scores(lp)
        preds = self._greedy_answers(model, examples)
        ent, mar = [], []
        for i in range(0, len(examples), bs):
            chunk = [replace(ex, target=p) for ex, p in zip(examples[i:i + bs], preds[i:i + bs], strict=True)]
            b = encode(self.tokenizer, chunk).to(_device(model))
            logits = model(input_ids=b.input_ids, attention_mask=b.attention_mask).logits[:, :-1].float()
            sel = (b.labels[:, 1:] != -100).float()                               # [B, T-1] answer positions
            lp = torch.log_softmax(logits, -1)
            h = -(lp.exp() * lp).sum(-1)                                          # [B, T-1] token entropy
            top2 = lp.exp().topk(2, -1).values
            gap = (top2[..., 0] - top2[..., 1]).masked_fill(sel == 0, float("inf"))
            ent.append(((h * sel).sum(1) / sel.sum(1).clamp(min=1)).cpu())
            mar.append((-gap.min(1).values).cpu())
        return torch.cat(ent), torch.cat(mar)

    @torch.no_grad()
    def teacher(self, model, examples: Sequence) -> list[tuple]:
        """The full model's own answers (pseudo-labels) and its answer-position log-probs ``[N_i, V]``."""
        from moeharden.tasks.metrics import choice_logprobs

        if self.task.kind == "multiple_choice":
            pick = choice_logprobs(model, self.tokenizer, examples, batch_size=self.batch_size).argmax(-1).tolist()
            pseudo = [replace(ex, target=ex.choices[j], label=j) for ex, j in zip(examples, pick, strict=True)]
        elif self.task.kind == "generation":
            preds = self._greedy_answers(model, examples)
            pseudo = [replace(ex, target=p) for ex, p in zip(examples, preds, strict=True)]
        else:
            pseudo = list(examples)
        cache = []
        for ex in pseudo:
            b = encode(self.tokenizer, [ex]).to(_device(model))
            al, _ = answer_logits(model(input_ids=b.input_ids, attention_mask=b.attention_mask).logits, b.labels)
            cache.append((ex, torch.log_softmax(al.float(), -1).cpu()))
        return cache

    def distill_loss(self, model, examples: Sequence, teachers: Sequence[tuple]) -> torch.Tensor:
        """KL(teacher ‖ model) at the pseudo-labels' answer positions (``examples`` is unused: no labels)."""
        pseudo = [t[0] for t in teachers]
        b = self._encode(pseudo).to(_device(model))
        al, _ = answer_logits(model(input_ids=b.input_ids, attention_mask=b.attention_mask).logits, b.labels)
        lt = torch.cat([t[1] for t in teachers]).to(al.device)          # [N, V] teacher log-probs
        ls = torch.log_softmax(al.float(), -1)
        return (lt.exp() * (lt - ls)).sum(-1).mean()


def task_ops(tokenizer, task, *, batch_size: int = 32) -> TaskOps:
    """The operations recovery needs for a loaded task (see :class:`TaskOps`)."""
    return TaskOps(tokenizer, task, batch_size=batch_size)
