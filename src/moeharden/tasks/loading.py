"""Task files, built-in presets, data loading and seeded splits.

A task says what text a model sees and how its answers are scored. Task files are data only: YAML
read with ``yaml.safe_load`` into frozen pydantic models (``version: 1``), every problem reported
at once; prompts are ``str.format_map`` templates over a row's fields, and templates that reach
into objects (``{x.y}``, ``{x[0]}``) are refused, so nothing in a task file can run code.

Where tasks come from (:func:`load_tasks` specs):

* a preset name shipped in ``moeharden/data/presets/`` (``glue-sst2``, ``wikitext2``, ``xsum``, ...),
  optionally ``NAME=path/to/file`` to read a local copy instead of the Hub;
* a task file ``path/to/tasks.yaml`` (all its tasks) or ``path/to/tasks.yaml#name`` (one task);
* ``lm-eval:NAME`` — any lm-evaluation-harness task (optional extra, see :mod:`moeharden.tasks.lmeval`);
* nothing: the checkpoint's own ``moeharden-tasks.yaml``.

Each loaded :class:`Task` holds three disjoint, seeded splits of :class:`Example` rows:
``attribution`` (calibration text for ranking experts), ``evaluation`` and ``train``.
"""

from __future__ import annotations

import csv
import json
import random
import re
import string
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from moeharden.errors import TaskError

TASK_FILE_NAME = "moeharden-tasks.yaml"
LM_EVAL_PREFIX = "lm-eval:"
FORMATS = ("jsonl", "json", "csv", "tsv", "parquet", "txt")
_SUFFIX_FORMAT = {".jsonl": "jsonl", ".json": "json", ".csv": "csv", ".tsv": "tsv", ".parquet": "parquet",
                  ".txt": "txt", ".raw": "txt", ".tokens": "txt"}
_DEFAULT_METRIC = {"multiple_choice": "accuracy", "generation": "exact_match", "perplexity": "perplexity"}
_KIND_METRICS = {"multiple_choice": {"accuracy"}, "perplexity": {"perplexity"},
                 "generation": {"exact_match", "rouge1", "rouge2", "rougeL"}}
# " = Title = " starts a WikiText article; " = = Section = = " does not
_ARTICLE_HEADING = re.compile(r"^ ?= [^=].* = ?$")

Kind = Literal["multiple_choice", "perplexity", "generation"]
Metric = Literal["accuracy", "exact_match", "rouge1", "rouge2", "rougeL", "perplexity"]


# --------------------------------------------------------------------------- schema
class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class DataSpec(_Frozen):
    """Where rows come from: a local file (``path``, relative to the task file) or a Hub dataset."""

    path: str | None = None
    format: Literal["jsonl", "json", "csv", "tsv", "parquet", "txt"] | None = None
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
    prompt: str | None = None            # str.format_map template over the row's fields
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
    """Problems between fields of one task entry (works on raw dicts too, so that they are
    reported together with type errors of other fields)."""
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
    version: Literal[1]
    tasks: list[TaskSpec] = Field(min_length=1)


def template_fields(template: str) -> list[str]:
    """Names of the row fields a prompt template reads.

    Raises:
        ValueError: positional ``{}``, attribute or index access (``{x.y}``, ``{x[0]}``),
            conversions (``{x!r}``) or nested fields in a format spec — anything beyond a plain
            field lookup is refused so that a template cannot reach Python objects.
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
            raise ValueError(f"prompt field {{{name}}} is not a plain field name "
                             "(attribute or index access and positional {} are not allowed)")
        if conv is not None or (spec and "{" in spec):
            raise ValueError(f"prompt field {{{name}}} uses a conversion or nested field, which is not allowed")
        names.append(name)
    return names


# --------------------------------------------------------------------------- loaded tasks
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

    @property
    def higher_is_better(self) -> bool:
        return self.metric != "perplexity"

    def calibration_texts(self, split: str = "attribution") -> list[str]:
        """Prompt + correct answer of every example of ``split`` (the routing-attribution input)."""
        return [ex.text for ex in getattr(self, split)]


# --------------------------------------------------------------------------- errors
def _format_errors(err: ValidationError, where: str, raw: Any) -> list[str]:
    lines = []
    for e in err.errors():
        loc = list(e["loc"])
        path = ""
        for i, part in enumerate(loc):
            if isinstance(part, int):
                path += f"[{part}]"
                if i == 1 and loc[0] == "tasks" and isinstance(raw, dict):
                    try:
                        name = raw["tasks"][part].get("name")
                        path += f" ({name})" if name else ""
                    except (AttributeError, IndexError, KeyError, TypeError):
                        pass
            else:
                path += ("." if path else "") + str(part)
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] not in ("missing", "extra_forbidden", "value_error") and "input" in e:
            msg += f" (got {e['input']!r:.60})"
        lines.append(f"  {path or '(top level)'}: {msg}")
    return lines


def parse_task_file(raw: Any, where: str) -> TaskFile:
    """Validate a task-file document (already parsed from YAML).

    Raises:
        TaskError: every problem at once, one line each with its field path.
    """
    try:
        tf = TaskFile.model_validate(raw)
    except ValidationError as e:
        lines = _format_errors(e, where, raw)
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
    """Read and validate a task file (``yaml.safe_load``; no tags that build objects).

    Raises:
        TaskError: missing file, YAML syntax error, or schema problems (all listed).
    """
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as e:
        raise TaskError(f"Cannot read task file {path}: {e.strerror or e}.") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise TaskError(f"Task file {path} is not valid YAML: {e}",
                        hint="Task files are plain YAML data; tags such as !function are not allowed.") from None
    return parse_task_file(raw, str(path))


# --------------------------------------------------------------------------- presets
def preset_names() -> list[str]:
    """Names of the built-in presets (``moeharden/data/presets/*.yaml``)."""
    root = resources.files("moeharden").joinpath("data", "presets")
    return sorted(p.name[:-5] for p in root.iterdir() if p.name.endswith(".yaml"))


def preset_spec(name: str) -> TaskSpec:
    """The validated task entry of one preset.

    Raises:
        TaskError: unknown preset (the message lists the known ones).
    """
    known = preset_names()
    if name not in known:
        raise TaskError(f"Unknown task {name!r}: not a preset, a task file, or lm-eval:NAME.",
                        hint=f"Presets: {', '.join(known)}. Task files end in .yaml.")
    res = resources.files("moeharden").joinpath("data", "presets", f"{name}.yaml")
    tf = parse_task_file(yaml.safe_load(res.read_text(encoding="utf-8")), f"preset {name}")
    return tf.tasks[0]


# --------------------------------------------------------------------------- data loading
def _read_local(path: Path, fmt: str | None) -> list[dict[str, Any]]:
    fmt = fmt or _SUFFIX_FORMAT.get(path.suffix.lower())
    if fmt is None:
        raise TaskError(f"Cannot tell the format of {path}.", hint=f"Set data.format to one of {', '.join(FORMATS)}.")
    if not path.is_file():
        raise TaskError(f"Data file {path} does not exist.")
    try:
        if fmt == "jsonl":
            with open(path, encoding="utf-8") as fh:
                return [json.loads(line) for line in fh if line.strip()]
        if fmt == "json":
            data = json.loads(path.read_text(encoding="utf-8"))
            if isinstance(data, dict) and isinstance(data.get("data"), list):
                data = data["data"]
            if not isinstance(data, list):
                raise TaskError(f"{path}: a json data file must hold a list of rows (or {{'data': [...]}}).")
            return data
        if fmt in ("csv", "tsv"):
            with open(path, encoding="utf-8", newline="") as fh:
                # GLUE's TSVs hold unbalanced quotes inside sentences: read tabs literally
                kw = {"delimiter": "\t", "quoting": csv.QUOTE_NONE} if fmt == "tsv" else {}
                return list(csv.DictReader(fh, **kw))
        if fmt == "parquet":
            try:
                import pyarrow.parquet as pq
            except ImportError:
                raise TaskError("Reading parquet needs pyarrow.", hint="pip install pyarrow") from None
            return pq.read_table(path).to_pylist()
        with open(path, encoding="utf-8") as fh:  # txt: one row per line
            return [{"text": line.rstrip("\n")} for line in fh]
    except (json.JSONDecodeError, UnicodeDecodeError, csv.Error, OSError) as e:
        raise TaskError(f"Cannot read {fmt} data file {path}: {e}") from None


def _read_hub(data: DataSpec) -> list[dict[str, Any]]:
    try:
        import datasets
    except ImportError:  # pragma: no cover - datasets is a dependency
        raise TaskError("Reading Hub datasets needs the `datasets` package.") from None
    try:
        ds = datasets.load_dataset(data.hub, data.config, split=data.split)
    except Exception as e:  # network, auth, missing config: all end here with one message
        raise TaskError(f"Cannot load Hub dataset {data.hub}" + (f" ({data.config})" if data.config else "")
                        + f", split {data.split}: {type(e).__name__}: {e}",
                        hint="Offline? Give a local copy: --task PRESET=path/to/file.jsonl.") from None
    return [dict(r) for r in ds]


def load_rows(spec: TaskSpec, base_dir: Path | None, *, confine: bool = False) -> list[dict[str, Any]]:
    """Read a task's rows from its local file or Hub dataset.

    Args:
        base_dir: directory that relative ``data.path`` values are resolved against.
        confine: refuse paths that leave ``base_dir`` (a checkpoint's own task file is untrusted).
    Raises:
        TaskError: unreadable file, unknown format, Hub unreachable, path outside the checkpoint.
    """
    d = spec.data
    if d.path is None:
        return _read_hub(d)
    path = Path(d.path).expanduser()
    if not path.is_absolute() and base_dir is not None:
        path = base_dir / path
    if confine and base_dir is not None and not path.resolve().is_relative_to(Path(base_dir).resolve()):
        raise TaskError(f"Task {spec.name!r} reads {d.path}, outside the checkpoint directory.",
                        hint="A checkpoint's task file may only read files inside the checkpoint.")
    return _read_local(path, d.format)


def _group_articles(texts: list[str]) -> list[str]:
    """Join WikiText lines into articles, each starting at a top-level ``= Title =`` heading."""
    articles: list[list[str]] = []
    for t in texts:
        if _ARTICLE_HEADING.match(t.rstrip()) or not articles:
            articles.append([])
        articles[-1].append(t.rstrip("\n"))
    return ["\n".join(a).strip("\n") for a in articles]


def _label_of(row: Mapping[str, Any], spec: TaskSpec, i: int, n_choices: int) -> int:
    raw = row.get(spec.label_field)
    val: Any = raw
    if spec.label_map is not None and str(raw) in spec.label_map:
        val = spec.label_map[str(raw)]
    elif isinstance(raw, str) and raw.strip().lstrip("-").isdigit():
        val = int(raw)  # csv/tsv cells are strings
    if isinstance(val, bool) or not isinstance(val, int) or not 0 <= val < n_choices:
        raise TaskError(f"Task {spec.name!r}, row {i}: label {raw!r} is outside the {n_choices} choices "
                        f"(expected an index 0..{n_choices - 1}"
                        + (" or a key of label_map)." if spec.label_map else ")."),
                        hint="Fix the data, or map string labels to indices with label_map.")
    return val


def rows_to_examples(spec: TaskSpec, rows: Sequence[Mapping[str, Any]]) -> list[Example]:
    """Turn raw rows into :class:`Example` objects (prompts filled, labels checked).

    Raises:
        TaskError: a row lacks a field the task reads, or a label is outside the choices.
    """
    if spec.kind == "perplexity":
        texts = []
        for i, r in enumerate(rows):
            if spec.text_field not in r:
                raise TaskError(f"Task {spec.name!r}, row {i} has no field {spec.text_field!r} (text_field).",
                                hint=f"Fields present: {', '.join(map(str, r))}.")
            texts.append(str(r[spec.text_field] or ""))
        if spec.documents == "article":
            texts = _group_articles(texts)
        return [Example(spec.kind, "", t, index=i) for i, t in enumerate(texts) if t.strip()]
    needed = template_fields(spec.prompt or "")
    needed += [f for f in (spec.choices_field, spec.label_field, spec.target_field) if f]
    out = []
    for i, r in enumerate(rows):
        missing = [f for f in needed if f not in r]
        if missing:
            raise TaskError(f"Task {spec.name!r}, row {i} has no field(s) {', '.join(sorted(set(missing)))}.",
                            hint=f"Fields present: {', '.join(map(str, r))}.")
        prompt = (spec.prompt or "").format_map(r)
        if spec.kind == "multiple_choice":
            choices = tuple(spec.choices) if spec.choices else tuple(map(str, r[spec.choices_field] or ()))
            if len(choices) < 2:
                raise TaskError(f"Task {spec.name!r}, row {i}: field {spec.choices_field!r} holds "
                                f"{len(choices)} choice(s); at least 2 are needed.")
            label = _label_of(r, spec, i, len(choices))
            out.append(Example(spec.kind, prompt, choices[label], choices, label, i))
        else:
            out.append(Example(spec.kind, prompt, spec.target_prefix + str(r[spec.target_field]), index=i))
    return out


def split_examples(examples: Sequence[Example], split: SplitSpec, *, limit: int | None,
                   seed: int | None, name: str) -> tuple[list[Example], list[Example], list[Example]]:
    """Shuffle with a seed and cut into disjoint (attribution, evaluation, train) splits.

    ``limit`` caps each split at ``limit`` examples (a prefix of the unlimited split). When the data holds fewer rows than the
    requested sizes, every split shrinks in proportion (the evaluation split takes the rest).

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


# --------------------------------------------------------------------------- resolving specs
def materialise(spec: TaskSpec, *, base_dir: Path | None, limit: int | None, seed: int | None,
                source: str, confine: bool = False) -> Task:
    """Load one task's data and split it (see :func:`split_examples`)."""
    examples = rows_to_examples(spec, load_rows(spec, base_dir, confine=confine))
    att, ev, tr = split_examples(examples, spec.split, limit=limit, seed=seed, name=spec.name)
    return Task(spec.name, spec.kind, spec.resolved_metric, spec.resolved_chance, att, ev, tr, spec, source)


def _with_local_file(spec: TaskSpec, path: str) -> TaskSpec:
    fmt = _SUFFIX_FORMAT.get(Path(path).suffix.lower())
    return spec.model_copy(update={"data": DataSpec(path=str(Path(path).expanduser()), format=fmt)})


def resolve_specs(spec: str, *, checkpoint_dir: Path | None = None) -> list[tuple[TaskSpec, Path | None, bool, str]]:
    """Parse one ``--task`` value into task entries: ``(spec, base_dir, confine, source)``.

    Raises:
        TaskError: unknown preset, missing or invalid task file, unknown task in ``file#name``.
    """
    name, _, override = spec.partition("=")
    file_part, _, only = spec.partition("#")
    if file_part.endswith((".yaml", ".yml")) or (Path(file_part).is_file() and not override):
        path = Path(file_part).expanduser()
        tf = read_task_file(path)
        entries = [t for t in tf.tasks if not only or t.name == only]
        if not entries:
            raise TaskError(f"Task file {path} has no task {only!r}.",
                            hint=f"Its tasks: {', '.join(t.name for t in tf.tasks)}.")
        return [(t, path.parent, False, str(path)) for t in entries]
    base = preset_spec(name.strip())
    if override:
        return [(_with_local_file(base, override.strip()), None, False, f"preset {name}={override}")]
    return [(base, None, False, f"preset {name}")]


def load_tasks(specs: Sequence[str] | None, *, checkpoint_dir: Path | None = None, limit: int | None = None,
               seed: int | None = None, lm_eval_include: Sequence[Path] | None = None,
               data_paths: Mapping[str, str | Path] | None = None) -> list[Task]:
    """Resolve task specs, load their data, and split it.

    Args:
        specs: preset names (``glue-sst2``, optionally ``glue-sst2=local/file.jsonl``), task-file
            paths (``tasks.yaml`` or ``tasks.yaml#name``) or ``lm-eval:NAME``; ``None`` or empty:
            the checkpoint's ``moeharden-tasks.yaml``.
        checkpoint_dir: local checkpoint directory (for its own task file).
        limit: cap on every split's size (a seeded sample).
        seed: split seed; ``None`` keeps each task file's ``split.seed``.
        lm_eval_include: extra directories of lm-eval task YAMLs.
        data_paths: ``{task name: local file}`` overrides (same as ``NAME=path``).

    Returns:
        Tasks in spec order.

    Raises:
        TaskError: unknown task, invalid task file (all problems listed), unreadable or empty
            data, labels outside the choices, duplicate task names.
    """
    if limit is not None and limit < 1:
        raise TaskError(f"--limit must be at least 1 (got {limit}).")
    entries: list[tuple[TaskSpec, Path | None, bool, str]] = []
    lm_names: list[str] = []
    if not specs:
        if checkpoint_dir is None or not (Path(checkpoint_dir) / TASK_FILE_NAME).is_file():
            raise TaskError("No --task given and the checkpoint has no moeharden-tasks.yaml.",
                            hint=f"Pass --task with a preset ({', '.join(preset_names())}), a task file, "
                                 "or lm-eval:NAME.")
        tf = read_task_file(Path(checkpoint_dir) / TASK_FILE_NAME)
        entries = [(t, Path(checkpoint_dir), True, f"checkpoint {TASK_FILE_NAME}") for t in tf.tasks]
    else:
        for s in specs:
            if s.startswith(LM_EVAL_PREFIX):
                lm_names.append(s[len(LM_EVAL_PREFIX):])
            else:
                entries += resolve_specs(s, checkpoint_dir=checkpoint_dir)
    if data_paths:
        entries = [(_with_local_file(t, str(data_paths[t.name])), None, False, src) if t.name in data_paths
                   else (t, b, c, src) for t, b, c, src in entries]
    tasks = [materialise(t, base_dir=b, limit=limit, seed=seed, source=src, confine=c) for t, b, c, src in entries]
    if lm_names:
        from moeharden.tasks.lmeval import load_lm_eval_tasks

        tasks += load_lm_eval_tasks(lm_names, include=lm_eval_include, limit=limit, seed=seed)
    names = [t.name for t in tasks]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise TaskError(f"Task name(s) {', '.join(dup)} given more than once.")
    return tasks
