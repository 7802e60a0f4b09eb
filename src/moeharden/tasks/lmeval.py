"""Optional bridge to lm-evaluation-harness: ``--task lm-eval:NAME``.

The harness is imported lazily (extra ``moeharden[lm-eval]``). A task is loaded through lm-eval's
``TaskManager`` (``--lm-eval-include DIR`` adds local task YAMLs); its evaluation documents are
shuffled with a seed and cut into the same disjoint splits as moeharden's own tasks. The
attribution split's documents, rendered by the task's own prompt functions, are the calibration
text; evaluation runs the harness itself on the already-loaded (possibly masked) model through its
Hugging Face wrapper ``HFLM``, restricted to the split's document indices.

lm-eval task YAMLs may run Python through ``!function`` tags. The harness's own installed tasks are
trusted as installed code; YAMLs from ``--lm-eval-include`` directories that contain ``!function``
are refused, since task files must be data only.
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from moeharden.errors import TaskError
from moeharden.tasks.examples import EvalResult, Example, Task
from moeharden.tasks.intervals import PROPORTION_METRICS, wilson
from moeharden.tasks.spec import SplitSpec
from moeharden.tasks.splits import split_examples

_KIND = {"multiple_choice": "multiple_choice", "loglikelihood": "generation",
         "generate_until": "generation", "loglikelihood_rolling": "perplexity"}


@dataclass(frozen=True)
class LmEvalState:
    """What evaluation needs to re-run the harness: its task object and the split's document ids."""

    task_obj: Any
    manager: Any
    metric_key: str
    output_type: str
    doc_ids: dict[str, list[int]]  # split name -> indices into the task's eval docs


def _import():
    try:
        import lm_eval  # noqa: F401
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise TaskError("lm-eval tasks need lm-evaluation-harness, which is not installed.",
                        hint="pip install 'moeharden[lm-eval]'") from None
    return TaskManager


@contextlib.contextmanager
def _quiet():
    """lm-eval logs and draws tqdm bars on stderr; the library must not print."""
    logger = logging.getLogger("lm_eval")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            yield
    finally:
        logger.setLevel(level)


def check_include_dirs(dirs: Sequence[Path]) -> list[str]:
    """Validate ``--lm-eval-include`` directories; returns them as strings.

    Raises:
        TaskError: a directory is missing, or one of its YAMLs uses ``!function`` (code).
    """
    out = []
    for d in dirs:
        d = Path(d).expanduser()
        if not d.is_dir():
            raise TaskError(f"--lm-eval-include {d} is not a directory.")
        for y in sorted([*d.rglob("*.yaml"), *d.rglob("*.yml")]):
            if "!function" in y.read_text(encoding="utf-8", errors="replace"):
                raise TaskError(f"lm-eval task file {y} uses !function, which runs Python code.",
                                hint="Task files must be data only: replace the !function with a Jinja "
                                     "template or a field name.")
        out.append(str(d))
    return out


def _load_one(manager, name: str):
    with _quiet():
        try:
            if hasattr(manager, "load"):  # lm-eval >= 0.4.10
                tasks = dict(manager.load([name])["tasks"])
            else:  # pragma: no cover - older harness
                from lm_eval.tasks import get_task_dict

                tasks = dict(get_task_dict([name], manager))
        except Exception as e:  # the harness raises KeyError/ValueError/... for unknown names
            raise TaskError(f"lm-eval cannot load task {name!r}: {type(e).__name__}: {e}",
                            hint="`lm-eval ls tasks` lists the harness's tasks; add local YAMLs with "
                                 "--lm-eval-include DIR.") from None
    if len(tasks) != 1:
        raise TaskError(f"lm-eval:{name} is a group of {len(tasks)} tasks; name one task at a time.",
                        hint=f"Its tasks: {', '.join(sorted(map(str, tasks))[:20])}.")
    (key, obj), = tasks.items()
    return str(getattr(obj, "task_name", None) or getattr(obj.config, "task", None) or key), obj


def _examples(obj, kind: str) -> list[Example]:
    """Render the task's eval docs with its own prompt functions; docs that do not fit are dropped."""
    out = []
    delim = getattr(obj.config, "target_delimiter", " ") or ""
    for i, doc in enumerate(obj.eval_docs):
        try:
            prompt = obj.doc_to_text(doc)
            target = obj.doc_to_target(doc)
            if kind == "multiple_choice":
                choices = tuple(delim + str(c) for c in obj.doc_to_choice(doc))
                label = target if isinstance(target, int) else [c.strip() for c in choices].index(str(target).strip())
                out.append(Example(kind, str(prompt), choices[label], choices, int(label), i))
            elif kind == "perplexity":
                out.append(Example(kind, "", str(target), index=i))
            else:
                target = target[0] if isinstance(target, list) and target else target
                out.append(Example(kind, str(prompt), delim + str(target), index=i))
        except (ValueError, IndexError, TypeError, KeyError):
            continue
    return out


def load_lm_eval_tasks(names: Sequence[str], *, include: Sequence[Path] | None = None, limit: int | None = None,
                       seed: int | None = None, split: SplitSpec | None = None) -> list[Task]:
    """Load lm-eval tasks and split their evaluation documents.

    Args:
        names: lm-eval task names (without the ``lm-eval:`` prefix).
        include: directories of local lm-eval task YAMLs (no ``!function``).
        limit, seed: as in :func:`moeharden.tasks.resolve.load_tasks` (seed ``None`` = 0).
        split: split sizes (default: attribution 128, evaluation the rest).
    Returns:
        Tasks of kind ``lm_eval``; ``metric`` is the task's first metric (``perplexity`` for any
        perplexity metric, so that lower-is-better is known downstream).
    Raises:
        TaskError: lm-eval missing, unknown or group task, unsupported output type, no documents.
    """
    TaskManager = _import()
    inc = check_include_dirs(include or [])
    managers: dict[bool, Any] = {}

    def manager_for(defaults: bool):
        if defaults not in managers:
            with _quiet():
                managers[defaults] = TaskManager(include_path=inc or None, include_defaults=defaults)
        return managers[defaults]

    out = []
    for name in names:
        found = None
        if inc:  # indexing the harness's own ~10k task files takes seconds: try the local ones first
            with contextlib.suppress(TaskError):
                found = (manager_for(False), *_load_one(manager_for(False), name))
        manager, full_name, obj = found or (manager_for(True), *_load_one(manager_for(True), name))
        otype = obj.OUTPUT_TYPE
        if otype not in _KIND:
            raise TaskError(f"lm-eval task {name!r} has output type {otype!r}, which is not supported.",
                            hint=f"Supported: {', '.join(_KIND)}.")
        metrics = list(getattr(obj, "_metric_fn_list", {}) or {})
        metric_key = metrics[0] if metrics else "acc"
        metric = "perplexity" if "perplexity" in metric_key else metric_key
        examples = _examples(obj, _KIND[otype])
        att, ev, tr = split_examples(examples, split or SplitSpec(), limit=limit, seed=seed, name=f"lm-eval:{name}")
        chance = None
        if otype == "multiple_choice" and metric in ("acc", "acc_norm") and ev:
            chance = round(sum(1.0 / len(ex.choices) for ex in ev) / len(ev), 6)
        state = LmEvalState(obj, manager, metric_key, otype, {
            "attribution": [e.index for e in att], "evaluation": [e.index for e in ev], "train": [e.index for e in tr]})
        out.append(Task(f"lm-eval:{full_name}", "lm_eval", metric, chance, att, ev, tr, None,
                        f"lm-eval:{name}", state, option=f"lm-eval:{name}"))
    return out


def evaluate_lm_eval(model, tokenizer, task: Task, *, split: str = "evaluation", batch_size: int = 32):
    """Run lm-eval on ``task``'s split with the loaded model (``HFLM`` around the model object).

    Returns:
        An :class:`moeharden.tasks.examples.EvalResult`; ``extra`` holds the harness's numeric results.
    Raises:
        TaskError: lm-eval missing, empty split, or the harness reported no value for the metric.
    """
    _import()
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    state: LmEvalState = task.lm_eval
    ids = state.doc_ids.get(split) or []
    if not ids:
        raise TaskError(f"Task {task.name!r} has no {split} documents to evaluate.")
    device = getattr(model, "device", None) or next(model.parameters()).device
    with _quiet():
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=str(device))
        res = simple_evaluate(model=lm, tasks=[state.task_obj], samples={task.name[len("lm-eval:"):]: ids},
                              task_manager=state.manager, bootstrap_iters=0, log_samples=False,
                              confirm_run_unsafe_code=False)
    results = next(iter(res["results"].values())) if res and res.get("results") else {}
    value = next((v for k, v in results.items() if k.split(",")[0] == state.metric_key
                  and isinstance(v, (int, float))), None)
    if value is None or (isinstance(value, float) and math.isnan(value)):
        raise TaskError(f"lm-eval returned no {state.metric_key!r} for {task.name!r}.")
    extra = {k: float(v) for k, v in results.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    return EvalResult(task.name, task.metric, float(value), len(ids), extra,
                      *proportion_interval(state.metric_key, float(value), len(ids)))


def proportion_interval(metric_key: str, value: float, n: int) -> tuple[float | None, float | None]:
    """Wilson interval of an lm-eval metric that is a proportion of ``n`` documents, else ``(None, None)``.

    The harness reports only the mean, so the number correct is recovered as ``round(value * n)``.

    Args:
        metric_key: the harness's metric name (``acc``, ``acc_norm``, ``exact_match``, ...).
        value: its value on the split; n: documents scored.
    Returns:
        ``(lo, hi)``, or ``(None, None)`` for a non-proportion metric, a value outside [0, 1] or ``n == 0``.
    """
    if metric_key not in PROPORTION_METRICS or n <= 0 or not 0.0 <= value <= 1.0:
        return None, None
    return wilson(round(value * n), n)
