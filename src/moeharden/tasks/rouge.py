"""ROUGE-1/2/L F1 of a generated text against its reference (generation tasks' metrics).

Google's ``rouge-score`` package (Porter stemming) when installed, else a built-in scorer with
the same tokenizer and no stemming; :func:`rouge_impl` says which one ran.
"""

from __future__ import annotations

import re
from collections import Counter
from typing import Any

from moeharden.errors import TaskError

ROUGE_KEYS = ("rouge1", "rouge2", "rougeL")


def _tokens(text: str) -> list[str]:
    # rouge-score's tokenizer without stemming: lowercase, non-alphanumerics split words
    return re.sub(r"[^a-z0-9]+", " ", text.lower()).split()


def _f1(overlap: int, n_pred: int, n_ref: int) -> float:
    if overlap == 0 or n_pred == 0 or n_ref == 0:
        return 0.0
    p, r = overlap / n_pred, overlap / n_ref
    return 2 * p * r / (p + r)


def _ngram_f1(pred: list[str], ref: list[str], n: int) -> float:
    pc = Counter(tuple(pred[i:i + n]) for i in range(len(pred) - n + 1))
    rc = Counter(tuple(ref[i:i + n]) for i in range(len(ref) - n + 1))
    return _f1(sum((pc & rc).values()), sum(pc.values()), sum(rc.values()))


def _lcs(a: list[str], b: list[str]) -> int:
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


_SCORER: list[Any] = []


def _scorer(rouge_scorer):
    if not _SCORER:
        _SCORER.append(rouge_scorer.RougeScorer(list(ROUGE_KEYS), use_stemmer=True))
    return _SCORER[0]


def rouge_scores(prediction: str, reference: str, *, impl: str = "auto") -> dict[str, float]:
    """ROUGE-1/2/L F1 of one prediction against one reference.

    Args:
        prediction: the generated text.
        reference: the reference text.
        impl: ``rouge_score`` (Google's package, Porter stemming), ``builtin`` (same tokenizer,
            no stemming) or ``auto`` (the package when installed).
    Returns:
        ``{"rouge1", "rouge2", "rougeL"}`` in [0, 1].
    Raises:
        TaskError: ``impl="rouge_score"`` and the package is not installed.
    """
    if impl in ("auto", "rouge_score"):
        try:
            from rouge_score import rouge_scorer
        except ImportError:
            if impl == "rouge_score":
                raise TaskError("rouge-score is not installed.", hint="pip install 'moeharden[rouge]'") from None
        else:
            sc = _scorer(rouge_scorer).score(reference, prediction)
            return {k: float(v.fmeasure) for k, v in sc.items()}
    p, r = _tokens(prediction), _tokens(reference)
    return {"rouge1": _ngram_f1(p, r, 1), "rouge2": _ngram_f1(p, r, 2),
            "rougeL": _f1(_lcs(p, r), len(p), len(r))}


def rouge_impl() -> str:
    """Which scorer ``impl="auto"`` uses here: ``rouge_score`` or ``builtin``."""
    try:
        import rouge_score  # noqa: F401
    except ImportError:
        return "builtin"
    return "rouge_score"
