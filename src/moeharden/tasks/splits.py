"""Seeded, disjoint splits of a task's examples, and materialising one task entry into a Task.

Every task is cut into ``attribution`` (calibration text for ranking experts), ``evaluation`` and
``train`` splits with a seeded shuffle; ``--limit`` keeps a prefix of each split, so limited
splits are subsets of the unlimited ones.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from pathlib import Path

from moeharden.errors import TaskError
from moeharden.tasks.examples import Example, Task
from moeharden.tasks.readers import load_rows, rows_to_examples
from moeharden.tasks.spec import SplitSpec, TaskSpec


def split_examples(examples: Sequence[Example], split: SplitSpec, *, limit: int | None,
                   seed: int | None, name: str) -> tuple[list[Example], list[Example], list[Example]]:
    """Shuffle with a seed and cut into disjoint (attribution, evaluation, train) splits.

    When the data holds fewer rows than the requested sizes, every split shrinks in proportion
    (the evaluation split takes the rest).

    Args:
        examples: all examples of the task.
        split: the requested sizes and seed.
        limit: cap on each split (a prefix of the unlimited split); ``None``: no cap.
        seed: shuffle seed; ``None`` keeps ``split.seed``.
        name: the task's name, for messages.
    Returns:
        ``(attribution, evaluation, train)``.
    Raises:
        TaskError: fewer than two examples (an attribution and an evaluation one are needed).
    """
    n = len(examples)
    if n == 0:
        raise TaskError(f"Task {name!r} has no examples: its dataset is empty.",
                        hint="Check the data file (and data.split for Hub datasets).")
    if n < 2:
        raise TaskError(f"Task {name!r} has only {n} example; at least 2 are needed "
                        "(one for attribution, one for evaluation).")
    a, t, e = split.attribution, split.train, split.evaluation
    want = a + t + (e if e is not None else 1)
    if want > n:  # shrink in proportion, keeping at least one attribution and one evaluation example
        a = max(1, a * n // want)
        t = min(t * n // want, n - a - 1)
    rest = n - a - t
    e = rest if e is None else min(e, rest)
    order = list(range(n))
    random.Random(split.seed if seed is None else seed).shuffle(order)
    pick = [examples[i] for i in order]
    att, ev, tr = pick[:a], pick[a:a + e], pick[a + e:a + e + t]
    # a limit keeps a prefix of each split: limited splits are subsets of the unlimited ones
    cap = n if limit is None else limit
    return att[:cap], ev[:cap], tr[:cap]


def materialise(spec: TaskSpec, *, base_dir: Path | None, limit: int | None, seed: int | None,
                source: str, confine: bool = False) -> Task:
    """Load one task's data and split it (see :func:`split_examples`).

    Args:
        spec: the task entry.
        base_dir, confine: as in :func:`moeharden.tasks.readers.load_rows`.
        limit, seed: as in :func:`split_examples`.
        source: where the entry came from (kept on the task).
    Returns:
        The loaded :class:`Task`.
    Raises:
        TaskError: unreadable or empty data, bad rows (see ``load_rows`` and ``rows_to_examples``).
    """
    examples = rows_to_examples(spec, load_rows(spec, base_dir, confine=confine))
    att, ev, tr = split_examples(examples, spec.split, limit=limit, seed=seed, name=spec.name)
    return Task(spec.name, spec.kind, spec.resolved_metric, spec.resolved_chance, att, ev, tr, spec, source)
