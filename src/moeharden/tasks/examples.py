"""Loaded tasks: scored examples, the task that holds their splits, results, and metric direction.

An :class:`Example` is self-describing (kind, prompt, target, choices, label), so that the
encoding, the metrics and the losses need nothing else. A :class:`Task` holds three disjoint,
seeded splits of examples: ``attribution`` (calibration text for ranking experts), ``evaluation``
and ``train``. An :class:`EvalResult` is one task's metric on one split (from
:mod:`moeharden.tasks.metrics` or the lm-eval bridge). :func:`higher_is_better` is the one place
that says which way a metric points.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from moeharden.tasks.spec import TaskSpec

# metrics where a smaller value is a better model; every other metric is higher-is-better
LOWER_IS_BETTER = frozenset({"perplexity"})


def higher_is_better(metric: str) -> bool:
    """Whether a larger value of ``metric`` means a better model (perplexity: no; accuracy: yes).

    Args:
        metric: a metric name (``accuracy``, ``exact_match``, ``rougeL``, ``perplexity``, an lm-eval key).
    Returns:
        ``False`` for lower-is-better metrics (:data:`LOWER_IS_BETTER`), else ``True``.
    """
    return metric not in LOWER_IS_BETTER


def best_possible(metric: str) -> float | None:
    """The best value ``metric`` can take (1.0 for fractions: accuracy, exact match, ROUGE), or
    ``None`` when there is none to reach (perplexity): an attacker at it can stop training."""
    return None if metric in LOWER_IS_BETTER else 1.0


@dataclass(frozen=True)
class Example:
    """One scored item, self-describing so that metrics and losses need nothing else.

    Attributes:
        kind: the task kind.
        prompt: text before the answer ("" for perplexity documents).
        target: the correct continuation: the right choice, the reference text, or the document.
        choices: candidate continuations (multiple_choice), else empty.
        label: index of the correct choice (multiple_choice), else None.
        index: row index in the source data (after article grouping).
    """

    kind: str
    prompt: str
    target: str
    choices: tuple[str, ...] = ()
    label: int | None = None
    index: int = -1

    @property
    def text(self) -> str:
        """Prompt followed by the correct answer: what the model is run on to record routing."""
        return self.prompt + self.target


@dataclass(frozen=True)
class Task:
    """A task with its data materialised into disjoint seeded splits.

    Attributes:
        name, kind, metric: from the task file (``kind`` may also be ``lm_eval``).
        chance: metric of a random guesser (None when undefined, e.g. perplexity).
        attribution, evaluation, train: disjoint example lists.
        spec: the validated task entry (None for lm-eval tasks).
        source: where the task came from (preset, file path, ``lm-eval:NAME``).
        option: the ``--task`` value that loads it again (absolute paths; ``""`` for the
            checkpoint's own task file, which is found without one).
        lm_eval: bridge state for lm-eval tasks (see :mod:`moeharden.tasks.lmeval`), else None.
    """

    name: str
    kind: str
    metric: str
    chance: float | None
    attribution: list[Example]
    evaluation: list[Example]
    train: list[Example]
    spec: TaskSpec | None = None
    source: str = ""
    lm_eval: Any = field(default=None, repr=False)
    option: str = ""

    @property
    def higher_is_better(self) -> bool:
        """Whether a larger metric value is better (see :func:`higher_is_better`)."""
        return higher_is_better(self.metric)

    def examples_sha256(self) -> str:
        """SHA-256 over the task's identity and every example of its three splits, in order: two
        scans of the same task and split sizes agree on it; a changed task or split does not."""
        import hashlib
        import json

        h = hashlib.sha256(json.dumps([self.name, self.kind, self.metric]).encode())
        for split in ("attribution", "evaluation", "train"):
            for ex in getattr(self, split):
                h.update(json.dumps([split, ex.kind, ex.prompt, ex.target, list(ex.choices), ex.label]).encode())
        return h.hexdigest()

    def calibration_texts(self, split: str = "attribution") -> list[str]:
        """Prompt + correct answer of every example of ``split`` (the routing-attribution input)."""
        return [ex.text for ex in getattr(self, split)]


@dataclass(frozen=True)
class EvalResult:
    """One task's metric on one split, with its 95% confidence interval.

    Attributes:
        task: task name. metric: metric name (``accuracy``, ``perplexity``, ``rougeL``, ...).
        value: the metric (fractions in [0, 1]; perplexity as is). n: examples scored.
        extra: other figures (all ROUGE scores, token counts, lm-eval's raw results).
        lo, hi: the 95% interval of ``value`` (Wilson for proportions, bootstrap for perplexity
            and ROUGE; see :mod:`moeharden.tasks.intervals`); ``None`` when not computable.
    """

    task: str
    metric: str
    value: float
    n: int
    extra: dict[str, Any] = field(default_factory=dict)
    lo: float | None = None
    hi: float | None = None

    @property
    def higher_is_better(self) -> bool:
        """Whether a larger value is better (see :func:`higher_is_better`)."""
        return higher_is_better(self.metric)

    def normalized(self, full: float) -> float:
        """The metric relative to the full model's: 100·value/full (perplexity: full model = 100)."""
        return 100.0 * self.value / full if full else float("nan")

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON form: ``task``, ``metric``, ``value``, ``lo``, ``hi``, ``n``, ``extra``."""
        return {"task": self.task, "metric": self.metric, "value": self.value, "lo": self.lo, "hi": self.hi,
                "n": self.n, "extra": self.extra}
