"""Seeded synthetic tasks for the embedded demo model, and the task file that describes them.

Three tasks of different kinds whose inputs use different characters, so that a router can tell
them apart from the first token on:

========== ================ ===================================== ===========================
name       kind             example (prompt -> answer)             scoring
========== ================ ===================================== ===========================
sentiment  classification   ``ybqfnmae:`` -> ``N``                 multiple_choice, accuracy
addition   arithmetic       ``37+45=`` -> ``082``                  generation, exact_match
reverse    transformation   ``KQBD>`` -> ``DBQK``                  generation, exact_match
========== ================ ===================================== ===========================

* ``sentiment``: a tone marker (``y`` sincere, ``x`` sarcastic) and 7 lowercase letters; ``a``-``k``
  count as negative, ``l``-``v`` as positive; the label is the majority, flipped when sarcastic
  (``N`` = 0, ``P`` = 1). Single-character choices keep scoring to one forward pass per row.
* ``addition``: two 2-digit numbers; the sum is written with 3 digits (zero-padded) so every
  answer has the same length.
* ``reverse``: 4 uppercase letters, answered reversed.

Every prompt and answer has a fixed length per task, so single-task batches need no padding.
Rows are plain dicts (``text`` plus ``label`` or ``answer``); :data:`TASKS` says how a row becomes
a prompt and an answer, and :func:`task_file_dict` writes the same templates into the task file
(``docs/CONTRACTS.md``, "Task files") so that training and later evaluation agree.
"""

from __future__ import annotations

import json
import random
import string
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from moeharden.tasks.examples import Example
from moeharden.tasks.spec import TASK_FILE_NAME, TaskSpec


@dataclass(frozen=True)
class SyntheticTask:
    """How one synthetic task is generated, prompted and scored.

    Attributes:
        name: unique task name (also the jsonl file stem).
        kind: ``multiple_choice`` or ``generation`` (task-file kinds).
        prompt: ``str.format_map`` template over the row's fields.
        make_row: ``rng -> row`` (a dict of plain JSON values).
        choices: fixed choice strings (multiple_choice), indexed by ``row["label"]``.
        answer_space: how many distinct answers a random guesser picks from (sets ``chance``).
        answer_len: characters in every answer (generation), used for ``max_new_tokens``.
    """

    name: str
    kind: str
    prompt: str
    make_row: Callable[[random.Random], dict[str, Any]]
    choices: tuple[str, ...] = ()
    answer_space: int = 0
    answer_len: int = 0

    def prompt_of(self, row: dict[str, Any]) -> str:
        return self.prompt.format_map(row)

    def answer_of(self, row: dict[str, Any]) -> str:
        """The reference continuation: the chosen choice, or the target text."""
        if self.kind == "multiple_choice":
            return self.choices[int(row["label"])]
        return str(row["answer"])

    def example(self, row: dict[str, Any]) -> Example:
        """The row as the task file's loader turns it into an example (prompt, answer, choices, label)."""
        if self.kind == "multiple_choice":
            label = int(row["label"])
            return Example(self.kind, self.prompt_of(row), self.choices[label], self.choices, label)
        return Example(self.kind, self.prompt_of(row), self.answer_of(row))

    @property
    def chance(self) -> float:
        """Metric of a uniform random guesser over the answer space."""
        return float(f"{1.0 / self.answer_space:.3g}")


_NEG, _POS = "abcdefghijk", "lmnopqrstuv"


def _sentiment_row(rng: random.Random) -> dict[str, Any]:
    # 7 polarity letters (odd: never a tie) after a tone marker: "y" sincere, "x" sarcastic (flips
    # the majority). The flip is an XOR, which attention plus a linear read-out cannot compute, so
    # the task needs its experts (MLPs), as real tasks do. The label is balanced by drawing it first.
    label, sarcastic = rng.randrange(2), rng.randrange(2)
    n_major = rng.randint(4, 7)
    major, minor = (_POS, _NEG) if label != sarcastic else (_NEG, _POS)
    letters = [rng.choice(major) for _ in range(n_major)] + [rng.choice(minor) for _ in range(7 - n_major)]
    rng.shuffle(letters)
    return {"text": "xy"[1 - sarcastic] + "".join(letters), "label": label}


def _addition_row(rng: random.Random) -> dict[str, Any]:
    a, b = rng.randrange(10, 100), rng.randrange(10, 100)
    return {"text": f"{a}+{b}", "answer": f"{a + b:03d}"}


def _reverse_row(rng: random.Random) -> dict[str, Any]:
    word = "".join(rng.choice(string.ascii_uppercase) for _ in range(4))
    return {"text": word, "answer": word[::-1]}


TASKS: dict[str, SyntheticTask] = {
    t.name: t
    for t in (
        SyntheticTask("sentiment", "multiple_choice", "{text}:", _sentiment_row, choices=("N", "P"),
                      answer_space=2),
        # sums of two 2-digit numbers lie in 20..198: 179 possible answers
        SyntheticTask("addition", "generation", "{text}=", _addition_row, answer_space=179, answer_len=3),
        SyntheticTask("reverse", "generation", "{text}>", _reverse_row, answer_space=26**4, answer_len=4),
    )
}

def _copy_row(rng: random.Random) -> dict[str, Any]:
    word = "".join(rng.choice(string.ascii_uppercase) for _ in range(4))
    return {"text": word, "answer": word}


def _majority_row(rng: random.Random) -> dict[str, Any]:
    # sentiment's letters without the tone marker: the label is the plain majority
    label, n_major = rng.randrange(2), rng.randint(4, 7)
    major, minor = (_POS, _NEG) if label else (_NEG, _POS)
    letters = [rng.choice(major) for _ in range(n_major)] + [rng.choice(minor) for _ in range(7 - n_major)]
    rng.shuffle(letters)
    return {"text": "".join(letters), "label": label}


# New tasks a licensee adapts the released model to (never in the demo model's training data, nor
# in its task file): what "legitimate fine-tuning still works" is measured on (bench/licensee.py).
LICENSEE_TASKS: dict[str, SyntheticTask] = {
    t.name: t
    for t in (
        SyntheticTask("copy", "generation", "{text}=", _copy_row, answer_space=26**4, answer_len=4),
        SyntheticTask("majority", "multiple_choice", "{text}>", _majority_row, choices=("N", "P"),
                      answer_space=2),
    )
}

# Every character any task can produce; the demo tokenizer is character-level over this set.
ALPHABET = "".join(sorted(set(string.ascii_letters + string.digits + "+=:>")))


def generate(name: str, n: int, seed: int, *, exclude: set[str] | None = None,
             distinct: bool = False) -> list[dict[str, Any]]:
    """Generate ``n`` rows of task ``name``, reproducibly from ``seed``.

    Args:
        name: a key of :data:`TASKS` or :data:`LICENSEE_TASKS`.
        n: number of rows.
        seed: RNG seed; the same (name, n, seed, exclude, distinct) always gives the same rows.
        exclude: row texts to skip (keeps evaluation rows out of the training data).
        distinct: never repeat a text.

    Returns:
        A list of row dicts.

    Raises:
        KeyError: unknown task name.
        ValueError: the task cannot produce ``n`` rows under these constraints.
    """
    task = TASKS[name] if name in TASKS else LICENSEE_TASKS[name]
    # str seeds hash deterministically in random.Random (unlike hash()), so tasks get independent streams
    rng = random.Random(f"{name}:{seed}")
    seen = set(exclude or ())
    rows: list[dict[str, Any]] = []
    tries = 0
    while len(rows) < n:
        tries += 1
        if tries > 50 * n + 1000:
            raise ValueError(f"task {name!r} cannot produce {n} rows with these exclusions")
        row = task.make_row(rng)
        if row["text"] in seen:
            continue
        if distinct:
            seen.add(row["text"])
        rows.append(row)
    return rows


def task_entry(task: SyntheticTask) -> dict[str, Any]:
    """The task-file entry of one demo task, without its ``split`` (data path ``tasks/<name>.jsonl``)."""
    entry: dict[str, Any] = {
        "name": task.name,
        "kind": task.kind,
        "data": {"path": f"tasks/{task.name}.jsonl", "format": "jsonl"},
        "prompt": task.prompt,
    }
    if task.kind == "multiple_choice":
        entry.update(choices=list(task.choices), label_field="label", metric="accuracy")
    else:
        # +1 leaves room for the end-of-sequence token the model emits after the answer
        entry.update(target_field="answer", metric="exact_match", max_new_tokens=task.answer_len + 1)
    entry.update(chance=task.chance)
    return entry


def task_spec(task: SyntheticTask) -> TaskSpec:
    """The validated task-file entry of one demo task (how evaluation scores it)."""
    return TaskSpec.model_validate(task_entry(task))


def task_file_dict(split: dict[str, int]) -> dict[str, Any]:
    """The task file (``version: 1``) describing every demo task; data paths are ``tasks/<name>.jsonl``."""
    return {"version": 1, "tasks": [{**task_entry(task), "split": dict(split)} for task in TASKS.values()]}


def write_task_file(out_dir: Path, rows_per_task: int, split: dict[str, int]) -> dict[str, list[dict]]:
    """Write ``moeharden-tasks.yaml`` and ``tasks/<name>.jsonl`` into ``out_dir``.

    The jsonl rows are distinct and drawn with ``split["seed"]``; the demo model never trains on
    them, so every split the task file defines is held out.

    Args:
        out_dir: checkpoint directory (must exist).
        rows_per_task: rows in each jsonl file (at least the sum of the split sizes).
        split: ``{"attribution": n, "evaluation": n, "train": n, "seed": s}``.

    Returns:
        ``{task name: rows}`` as written.

    Raises:
        ValueError: the split sizes need more rows than ``rows_per_task``.
    """
    need = sum(v for k, v in split.items() if k != "seed")
    if need > rows_per_task:
        raise ValueError(f"split sizes need {need} rows but only {rows_per_task} are written per task")
    written = {name: generate(name, rows_per_task, split["seed"], distinct=True) for name in TASKS}
    write_rows(out_dir, written, split)
    return written


def write_rows(out_dir: Path, rows: dict[str, list[dict]], split: dict[str, int]) -> Path:
    """Write ``tasks/<name>.jsonl`` of the given rows and the task file over them; returns its path."""
    (out_dir / "tasks").mkdir(parents=True, exist_ok=True)
    for name, task_rows in rows.items():
        with open(out_dir / "tasks" / f"{name}.jsonl", "w", encoding="utf-8") as fh:
            for row in task_rows:
                fh.write(json.dumps(row, sort_keys=True) + "\n")
    with open(out_dir / TASK_FILE_NAME, "w", encoding="utf-8") as fh:
        yaml.safe_dump(task_file_dict(split), fh, sort_keys=False)
    return out_dir / TASK_FILE_NAME
