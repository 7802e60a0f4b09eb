"""Reading a task's rows (local files or Hub datasets) and turning them into examples.

Local formats: jsonl, json (a list, or ``{"data": [...]}``), csv, tsv (tabs read literally, as
GLUE's files need), parquet (with pyarrow) and txt (one ``{"text": line}`` row per line). Hub
datasets are read through ``datasets`` when online. A checkpoint's own task file is untrusted:
its paths are confined to the checkpoint directory.
"""

from __future__ import annotations

import csv
import json
import re
import string
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from moeharden.errors import TaskError
from moeharden.io.files import conversion_message
from moeharden.tasks.examples import Example
from moeharden.tasks.spec import DataSpec, TaskSpec, template_fields

FORMATS = ("jsonl", "json", "csv", "tsv", "parquet", "txt")
_SUFFIX_FORMAT = {".jsonl": "jsonl", ".json": "json", ".csv": "csv", ".tsv": "tsv", ".parquet": "parquet",
                  ".txt": "txt", ".raw": "txt", ".tokens": "txt"}
# " = Title = " starts a WikiText article; " = = Section = = " does not
_ARTICLE_HEADING = re.compile(r"^ ?= [^=].* = ?$")
# characters of one filled prompt: far beyond any model's context (prompts are cut to max_length
# tokens later), far below memory; a template repeating a long field a million times stops here
MAX_PROMPT_CHARS = 8 << 20


def format_of(path: str | Path) -> str | None:
    """The data format a file's suffix implies (``None`` when the suffix says nothing)."""
    return _SUFFIX_FORMAT.get(Path(path).suffix.lower())


def _read_local(path: Path, fmt: str | None) -> list[dict[str, Any]]:
    fmt = fmt or format_of(path)
    if fmt is None:
        raise TaskError(f"Cannot tell the format of {path}.", hint=f"Set data.format to one of {', '.join(FORMATS)}.")
    if not path.exists():
        raise TaskError(f"Data file {path} does not exist.")
    if not path.is_file():     # a directory, FIFO or device: would fail, or block forever
        raise TaskError(f"Data file {path} is not a regular file.", hint="Point data.path at the data file.")
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
    except ValueError as e:     # an integer longer than Python converts (json), an arrow conversion
        raise TaskError(conversion_message(f"The {fmt} data file {path}", e)) from None
    except RecursionError:
        raise TaskError(f"{fmt} data file {path} nests too deeply to be read.") from None


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


def _inside(path: Path, base_dir: Path) -> bool:
    """Whether ``path`` (symlinks resolved) lies in ``base_dir`` or, for a Hub cache snapshot, its blobs."""
    from moeharden.io.sidefiles import allowed_roots

    real = path.resolve()
    return any(real.is_relative_to(r) for r in allowed_roots(base_dir))


def load_rows(spec: TaskSpec, base_dir: Path | None, *, confine: bool = False) -> list[dict[str, Any]]:
    """Read a task's rows from its local file or Hub dataset.

    Args:
        spec: the task entry.
        base_dir: directory that relative ``data.path`` values are resolved against.
        confine: refuse paths that leave ``base_dir`` (a checkpoint's own task file is untrusted).
    Returns:
        The rows as dicts.
    Raises:
        TaskError: unreadable file, unknown format, Hub unreachable, path outside the checkpoint.
    """
    d = spec.data
    if d.path is None:
        return _read_hub(d)
    path = Path(d.path).expanduser()
    if not path.is_absolute() and base_dir is not None:
        path = base_dir / path
    if confine and base_dir is not None and not _inside(path, Path(base_dir)):
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
    elif isinstance(raw, str) and raw.strip().lstrip("-").isdigit() and len(raw) <= 100:
        val = int(raw)  # csv/tsv cells are strings (a longer one is no index: refused below)
    if isinstance(val, bool) or not isinstance(val, int) or not 0 <= val < n_choices:
        shown = repr(raw) if len(repr(raw)) <= 60 else repr(raw)[:57] + "..."
        raise TaskError(f"Task {spec.name!r}, row {i}: label {shown} is outside the {n_choices} choices "
                        f"(expected an index 0..{n_choices - 1}"
                        + (" or a key of label_map)." if spec.label_map else ")."),
                        hint="Fix the data, or map string labels to indices with label_map.")
    return val


def _fill_prompt(pieces: list[tuple[str, str | None]], row: Mapping[str, Any], spec: TaskSpec, i: int) -> str:
    """One row's prompt: the template's literal text with each ``{field}`` replaced by ``str(row[field])``
    (what ``str.format_map`` gives for the plain placeholders a task file may hold), at most
    :data:`MAX_PROMPT_CHARS` long.

    Raises:
        TaskError: the filled prompt would be longer than :data:`MAX_PROMPT_CHARS`.
    """
    parts, size = [], 0
    for literal, name in pieces:
        parts.append(literal)
        if name is not None:
            parts.append(str(row[name]))
        size += len(literal) + (len(parts[-1]) if name is not None else 0)
        if size > MAX_PROMPT_CHARS:
            raise TaskError(f"Task {spec.name!r}, row {i}: its prompt would be longer than {MAX_PROMPT_CHARS} "
                            "characters.", hint="Shorten the prompt template or the row's fields.")
    return "".join(parts)


def rows_to_examples(spec: TaskSpec, rows: Sequence[Mapping[str, Any]]) -> list[Example]:
    """Turn raw rows into :class:`Example` objects (prompts filled, labels checked).

    Args:
        spec: the task entry (kind, templates, field names).
        rows: rows as read by :func:`load_rows`.
    Returns:
        One example per row (perplexity: per non-empty document, after article grouping).
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
    needed = template_fields(spec.prompt or "")     # plain {field} placeholders only (checked at load)
    pieces = [(literal, name) for literal, name, _, _ in string.Formatter().parse(spec.prompt or "")]
    needed += [f for f in (spec.choices_field, spec.label_field, spec.target_field) if f]
    out = []
    for i, r in enumerate(rows):
        missing = [f for f in needed if f not in r]
        if missing:
            raise TaskError(f"Task {spec.name!r}, row {i} has no field(s) {', '.join(sorted(set(missing)))}.",
                            hint=f"Fields present: {', '.join(map(str, r))}.")
        prompt = _fill_prompt(pieces, r, spec, i)
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
