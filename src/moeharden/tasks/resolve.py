"""From ``--task`` values to loaded tasks: presets, task files, lm-eval names, the checkpoint's own file.

Where tasks come from (:func:`load_tasks` specs):

* a preset name shipped in ``moeharden/data/presets/`` (``glue-sst2``, ``wikitext2``, ``xsum``, ...),
  optionally ``NAME=path/to/file`` to read a local copy instead of the Hub;
* a task file ``path/to/tasks.yaml`` (all its tasks) or ``path/to/tasks.yaml#name`` (one task);
* ``lm-eval:NAME`` — any lm-evaluation-harness task (optional extra, see :mod:`moeharden.tasks.lmeval`);
* nothing: the checkpoint's own ``moeharden-tasks.yaml`` (its paths confined to the checkpoint).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from importlib import resources
from pathlib import Path

import yaml

from moeharden.errors import TaskError
from moeharden.tasks.examples import Task
from moeharden.tasks.readers import format_of
from moeharden.tasks.spec import TASK_FILE_NAME, DataSpec, TaskSpec, parse_task_file, read_task_file
from moeharden.tasks.splits import materialise

LM_EVAL_PREFIX = "lm-eval:"

# one resolved task entry: (spec, directory its relative paths start from, confine paths?, source,
# the --task value that loads this one task again: absolute paths, "" for the checkpoint's own file)
Entry = tuple[TaskSpec, Path | None, bool, str, str]


def preset_names() -> list[str]:
    """Names of the built-in presets (``moeharden/data/presets/*.yaml``)."""
    root = resources.files("moeharden").joinpath("data", "presets")
    return sorted(p.name[:-5] for p in root.iterdir() if p.name.endswith(".yaml"))


def preset_spec(name: str) -> TaskSpec:
    """The validated task entry of one preset.

    Args:
        name: a preset name (see :func:`preset_names`).
    Returns:
        Its :class:`TaskSpec`.
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


def _with_local_file(spec: TaskSpec, path: str) -> TaskSpec:
    return spec.model_copy(update={"data": DataSpec(path=str(Path(path).expanduser()), format=format_of(path))})


def resolve_specs(spec: str) -> list[Entry]:
    """Parse one ``--task`` value (not ``lm-eval:``) into task entries (see :data:`Entry`).

    Args:
        spec: ``PRESET``, ``PRESET=local/file``, ``tasks.yaml`` or ``tasks.yaml#name``.
    Returns:
        The entries, in file order.
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
        return [(t, path.parent, False, str(path), f"{path.resolve()}#{t.name}") for t in entries]
    base = preset_spec(name.strip())
    if override:
        local = Path(override.strip()).expanduser()
        return [(_with_local_file(base, override.strip()), None, False, f"preset {name}={override}",
                 f"{name.strip()}={local.resolve()}")]
    return [(base, None, False, f"preset {name}", name.strip())]


def load_tasks(specs: Sequence[str] | None, *, checkpoint_dir: Path | None = None, limit: int | None = None,
               seed: int | None = None, lm_eval_include: Sequence[Path] | None = None) -> list[Task]:
    """Resolve task specs, load their data, and split it.

    Args:
        specs: preset names (``glue-sst2``, optionally ``glue-sst2=local/file.jsonl``), task-file
            paths (``tasks.yaml`` or ``tasks.yaml#name``) or ``lm-eval:NAME``; ``None`` or empty:
            the checkpoint's ``moeharden-tasks.yaml``.
        checkpoint_dir: local checkpoint directory (for its own task file).
        limit: cap on every split's size (a seeded sample).
        seed: split seed; ``None`` keeps each task file's ``split.seed``.
        lm_eval_include: extra directories of lm-eval task YAMLs.

    Returns:
        Tasks in spec order.

    Raises:
        TaskError: unknown task, invalid task file (all problems listed), unreadable or empty
            data, labels outside the choices, duplicate task names.
    """
    if limit is not None and limit < 1:
        raise TaskError(f"--limit must be at least 1 (got {limit}).")
    entries: list[Entry] = []
    lm_names: list[str] = []
    if not specs:
        if checkpoint_dir is None or not (Path(checkpoint_dir) / TASK_FILE_NAME).is_file():
            raise TaskError("No --task given and the checkpoint has no moeharden-tasks.yaml.",
                            hint=f"Pass --task with a preset ({', '.join(preset_names())}), a task file, "
                                 "or lm-eval:NAME.")
        tf = read_task_file(Path(checkpoint_dir) / TASK_FILE_NAME)
        entries = [(t, Path(checkpoint_dir), True, f"checkpoint {TASK_FILE_NAME}", "") for t in tf.tasks]
    else:
        for s in specs:
            if s.startswith(LM_EVAL_PREFIX):
                lm_names.append(s[len(LM_EVAL_PREFIX):])
            else:
                entries += resolve_specs(s)
    tasks = [replace(materialise(t, base_dir=b, limit=limit, seed=seed, source=src, confine=c), option=opt)
             for t, b, c, src, opt in entries]
    if lm_names:
        from moeharden.tasks.lmeval import load_lm_eval_tasks

        tasks += load_lm_eval_tasks(lm_names, include=lm_eval_include, limit=limit, seed=seed)
    names = [t.name for t in tasks]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise TaskError(f"Task name(s) {', '.join(dup)} given more than once.")
    return tasks
