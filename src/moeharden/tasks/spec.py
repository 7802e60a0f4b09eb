"""The task-file schema: what a task file may say, validated all at once.

A task says what text a model sees and how its answers are scored. Task files are data only: YAML
read with ``yaml.safe_load`` into frozen pydantic models (``version: 1``), every problem reported
at once; prompts are templates of plain ``{field}`` placeholders over a row's fields, and templates
that reach into objects (``{x.y}``, ``{x[0]}``), convert (``{x!r}``) or format (``{x:>9}``) are
refused, so nothing in a task file can run code or blow a prompt up to gigabytes.
See docs/CONTRACTS.md, "Task files", for the fields.
"""

from __future__ import annotations

import string
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from moeharden.errors import TaskError, validation_problems

TASK_FILE_NAME = "moeharden-tasks.yaml"   # a checkpoint's own task file
_DEFAULT_METRIC = {"multiple_choice": "accuracy", "generation": "exact_match", "perplexity": "perplexity"}
_KIND_METRICS = {"multiple_choice": {"accuracy"}, "perplexity": {"perplexity"},
                 "generation": {"exact_match", "rouge1", "rouge2", "rougeL"}}

Kind = Literal["multiple_choice", "perplexity", "generation"]
Metric = Literal["accuracy", "exact_match", "rouge1", "rouge2", "rougeL", "perplexity"]
Format = Literal["jsonl", "json", "csv", "tsv", "parquet", "txt"]


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class DataSpec(_Frozen):
    """Where rows come from: a local file (``path``, relative to the task file) or a Hub dataset."""

    path: str | None = None
    format: Format | None = None
    hub: str | None = None        # Hub dataset id, read through `datasets` when online
    config: str | None = None     # Hub dataset configuration ("sst2", "wikitext-2-raw-v1")
    split: str | None = None      # Hub split ("validation", "test")

    @model_validator(mode="after")
    def _one_source(self) -> DataSpec:
        if (self.path is None) == (self.hub is None):
            raise ValueError("give exactly one of data.path (local file) or data.hub (Hub dataset)")
        if self.hub is not None and self.split is None:
            raise ValueError("data.split is required with data.hub")
        return self


class SplitSpec(_Frozen):
    """Sizes of the disjoint splits; ``evaluation: null`` takes every row left over."""

    attribution: int = Field(128, ge=1)
    evaluation: int | None = Field(None, ge=1)
    train: int = Field(0, ge=0)
    seed: int = 0


class TaskSpec(_Frozen):
    """One task of a task file (see docs/CONTRACTS.md, "Task files")."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", max_length=100)
    kind: Kind
    data: DataSpec
    description: str | None = None
    prompt: str | None = None            # template of plain {field} placeholders over the row's fields
    choices: list[str] | None = Field(None, min_length=2)
    choices_field: str | None = None     # the row holds the list of choices
    label_field: str | None = None       # int index into the choices (or a key of label_map)
    label_map: dict[str, int] | None = None
    target_field: str | None = None      # generation: reference text
    target_prefix: str = ""              # generation: put before the target when scoring its loss
    text_field: str = "text"             # perplexity: document text
    documents: Literal["row", "article"] = "row"  # perplexity: "article" joins WikiText lines per article
    metric: Metric | None = None
    chance: float | None = Field(None, ge=0)
    max_new_tokens: int = Field(32, ge=1, le=4096)
    stop: list[str] = Field(default_factory=lambda: ["\n"])  # generation stops at these or at eos
    max_length: int | None = Field(None, ge=8)   # tokens of prompt + answer; prompts cut from the left
    window: int | None = Field(None, ge=2)       # perplexity: tokens of context per forward
    stride: int | None = Field(None, ge=1)       # perplexity: new tokens scored per window (< window)
    split: SplitSpec = Field(default_factory=SplitSpec)

    @field_validator("prompt")
    @classmethod
    def _safe_template(cls, v: str | None) -> str | None:
        if v is not None:
            template_fields(v)
        return v

    @model_validator(mode="after")
    def _consistent(self) -> TaskSpec:
        problems = cross_field_problems(self.model_dump())
        if problems:
            raise ValueError("; ".join(problems))
        return self

    @property
    def resolved_metric(self) -> str:
        """The file's metric, else the kind's default (accuracy / exact_match / perplexity)."""
        return self.metric or _DEFAULT_METRIC[self.kind]

    @property
    def resolved_chance(self) -> float | None:
        """Metric of a random guesser: the file's value, else 1/choices for fixed choices."""
        if self.chance is not None:
            return self.chance
        if self.kind == "multiple_choice" and self.choices:
            return round(1.0 / len(self.choices), 6)
        return None


def cross_field_problems(t: Mapping[str, Any]) -> list[str]:
    """Problems between fields of one task entry.

    Works on raw dicts too, so that they are reported together with type errors of other fields.

    Args:
        t: one task entry (a dict as parsed from YAML, or a ``TaskSpec.model_dump()``).
    Returns:
        One message per problem (empty when consistent or when ``kind`` is unknown).
    """
    problems = []
    kind, metric = t.get("kind"), t.get("metric")
    if kind not in _KIND_METRICS:
        return problems
    if metric is not None and metric not in _KIND_METRICS[kind]:
        problems.append(f"metric {metric!r} does not fit kind {kind!r} "
                        f"(use {' or '.join(sorted(_KIND_METRICS[kind]))})")
    if kind in ("multiple_choice", "generation") and t.get("prompt") is None:
        problems.append(f"prompt is required for kind {kind!r}")
    if kind == "multiple_choice":
        choices = t.get("choices")
        if (choices is None) == (t.get("choices_field") is None):
            problems.append("give exactly one of choices (a list) or choices_field (a row field)")
        if t.get("label_field") is None:
            problems.append("label_field is required for kind 'multiple_choice'")
        lm = t.get("label_map")
        if isinstance(lm, Mapping) and isinstance(choices, list):
            bad = {k: i for k, i in lm.items() if not (isinstance(i, int) and 0 <= i < len(choices))}
            if bad:
                problems.append(f"label_map values {bad} are outside the {len(choices)} choices")
    if kind == "generation" and t.get("target_field") is None:
        problems.append("target_field is required for kind 'generation'")
    w, st = t.get("window"), t.get("stride")
    if isinstance(w, int) and isinstance(st, int) and st >= w:
        problems.append(f"stride ({st}) must be smaller than window ({w})")
    return problems


class TaskFile(_Frozen):
    """A whole task file: ``version: 1`` and at least one task."""

    version: Literal[1]
    tasks: list[TaskSpec] = Field(min_length=1)


def template_fields(template: str) -> list[str]:
    """Names of the row fields a prompt template reads.

    Args:
        template: a prompt template: literal text with plain ``{field}`` placeholders (``{{`` and
            ``}}`` for literal braces).
    Returns:
        The field names in order of appearance.
    Raises:
        ValueError: positional ``{}``, attribute or index access (``{x.y}``, ``{x[0]}``),
            conversions (``{x!r}``) or format specs (``{x:>9}``) — anything beyond a plain field
            lookup is refused, so that a template can neither reach Python objects nor pad a field
            to gigabytes (``{x:>999999999}``) nor fail on a value of another type (``{x:d}``). (A
            ``ValueError`` so that pydantic reports it with the other problems of the file.)
    """
    names = []
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as e:
        raise ValueError(f"bad prompt template: {e}") from None
    for _, name, spec, conv in parsed:
        if name is None:
            continue
        if not name.isidentifier():
            raise ValueError(f"prompt field {{{name[:60]}}} is not a plain field name "
                             "(attribute or index access and positional {} are not allowed)")
        if conv is not None or spec:
            raise ValueError(f"prompt field {{{name[:60]}}} has a conversion or format spec "
                             f"({('!' + conv) if conv else ''}{(':' + spec[:20]) if spec else ''}); only plain "
                             "{field} placeholders are allowed")
        names.append(name)
    return names


def _task_label(raw: Any):
    """``label(loc)`` for :func:`validation_problems`: the task's name after ``tasks[i]``."""
    def label(loc: tuple) -> str | None:
        if len(loc) != 2 or loc[0] != "tasks" or not isinstance(raw, dict):
            return None
        try:
            name = raw["tasks"][loc[1]].get("name")
        except (AttributeError, IndexError, KeyError, TypeError):
            return None
        return name if isinstance(name, str) and name else None
    return label


def parse_task_file(raw: Any, where: str) -> TaskFile:
    """Validate a task-file document (already parsed from YAML).

    Args:
        raw: the parsed YAML document.
        where: how to name the file in messages (a path, ``preset NAME``).
    Returns:
        The validated :class:`TaskFile`.
    Raises:
        TaskError: every problem at once, one line each with its field path; duplicate task names.
    """
    try:
        tf = TaskFile.model_validate(raw)
    except ValidationError as e:
        lines = [f"  {line}" for line in validation_problems(e, label=_task_label(raw))]
        # cross-field checks only run inside pydantic once every field parses: add them for the rest
        failed_whole = {e_["loc"][:2] for e_ in e.errors() if e_["type"] == "value_error" and len(e_["loc"]) == 2}
        raw_tasks = raw.get("tasks") if isinstance(raw, dict) else None
        for i, t in enumerate(raw_tasks if isinstance(raw_tasks, list) else []):
            if isinstance(t, dict) and ("tasks", i) not in failed_whole:
                label = f"tasks[{i}]" + (f" ({t['name']})" if isinstance(t.get("name"), str) else "")
                lines += [f"  {label}: {p}" for p in cross_field_problems(t)]
        raise TaskError(f"Task file {where} has {len(lines)} problem(s):\n" + "\n".join(lines),
                        hint="See docs/CONTRACTS.md, 'Task files', for the schema.") from None
    names = [t.name for t in tf.tasks]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise TaskError(f"Task file {where} defines task(s) {', '.join(dup)} more than once.")
    return tf


def read_task_file(path: Path) -> TaskFile:
    """Read and validate a task file (``yaml.safe_load``; no tags that build objects, no aliases).

    Args:
        path: the YAML file.
    Returns:
        The validated :class:`TaskFile`.
    Raises:
        TaskError: missing, binary or special file, YAML syntax error, anchors/aliases or deep
            nesting, or schema problems (all listed).
    """
    from moeharden.io.files import load_yaml_data, read_small_text

    # a regular UTF-8 text file (not a binary, a FIFO or /dev/zero), parsed without aliases (bounded)
    text = read_small_text(Path(path), what="task file", error=TaskError)
    raw = load_yaml_data(text, where=f"Task file {path}", error=TaskError)
    return parse_task_file(raw, str(path))
