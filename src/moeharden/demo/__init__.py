"""The embedded demo model: a tiny task-specialised Mixtral MoE, trained on CPU and cached.

:func:`build_demo_model` trains the model of :mod:`moeharden.demo.train` on the synthetic tasks of
:mod:`moeharden.demo.synthetic` (or reuses the cached copy whose recipe hash matches) and copies it
into a directory laid out like any Hub checkpoint::

    config.json, generation_config.json, model.safetensors      # MixtralForCausalLM
    tokenizer.json, tokenizer_config.json                       # AutoTokenizer loads it
    moeharden-tasks.yaml, tasks/<name>.jsonl                    # task file (data only)
    moeharden-demo-recipe.json                                  # recipe + measured training stats

The cache lives in ``$MOEHARDEN_CACHE/demo-<hash>`` or ``~/.cache/moeharden/demo-<hash>``
(``$XDG_CACHE_HOME`` respected). :func:`run_demo` is what ``moeharden demo`` calls.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from moeharden import __version__
from moeharden.demo.synthetic import TASK_FILE_NAME, TASKS, write_task_file
from moeharden.demo.train import DemoRecipe, load_recipe
from moeharden.errors import CheckpointError

RECIPE_FILE_NAME = "moeharden-demo-recipe.json"
RECIPE_SCHEMA = "moeharden.demo-recipe/1"

__all__ = ["DemoResult", "build_demo_model", "cache_root", "run_demo", "RECIPE_FILE_NAME", "TASK_FILE_NAME"]


def cache_root() -> Path:
    """``$MOEHARDEN_CACHE``, else ``$XDG_CACHE_HOME/moeharden``, else ``~/.cache/moeharden``."""
    if os.environ.get("MOEHARDEN_CACHE"):
        return Path(os.environ["MOEHARDEN_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "moeharden"


def _read_stamp(model_dir: Path) -> dict[str, Any] | None:
    try:
        stamp = json.loads((model_dir / RECIPE_FILE_NAME).read_text("utf-8"))
    except (OSError, ValueError):
        return None
    complete = all((model_dir / f).is_file() for f in ("config.json", "model.safetensors", "tokenizer.json",
                                                        TASK_FILE_NAME))
    return stamp if complete else None


def _replace_dir(src: Path, dest: Path) -> None:
    """Move a finished directory into place; an older ``dest`` is removed only after ``src`` is whole."""
    if dest.exists():
        old = dest.with_name(f"{dest.name}.old-{uuid.uuid4().hex[:8]}")
        dest.rename(old)
        src.rename(dest)
        shutil.rmtree(old, ignore_errors=True)
    else:
        src.rename(dest)


def _train_into(cache_dir: Path, recipe: DemoRecipe, steps: int | None) -> None:
    from moeharden import console as ui
    from moeharden.demo.train import train_demo

    cache_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=cache_dir.name + ".tmp-", dir=cache_dir.parent))
    try:
        heldout = write_task_file(tmp, recipe.data.rows_per_task, recipe.data.split)
        total = recipe.train.steps if steps is None else steps
        with ui.progress_bar("Training the demo MoE", total=total) as advance:
            model, tok, stats = train_demo(recipe, heldout, steps=steps, progress=advance)
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        stamp = {
            "schema": RECIPE_SCHEMA,
            "moeharden_version": __version__,
            "recipe_hash": recipe.hash(),
            "recipe": recipe.model_dump(),
            "training": stats.to_dict(),
            "tasks": {name: {"kind": t.kind, "prompt": t.prompt, "chance": t.chance} for name, t in TASKS.items()},
        }
        (tmp / RECIPE_FILE_NAME).write_text(json.dumps(stamp, indent=2) + "\n", "utf-8")
        _replace_dir(tmp, cache_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def build_demo_model(out_dir: Path, *, retrain: bool = False, recipe: DemoRecipe | None = None,
                     steps: int | None = None) -> Path:
    """Make the demo checkpoint available in ``out_dir`` (trained once, then reused from the cache).

    Args:
        out_dir: destination checkpoint directory; replaced atomically if it exists.
        retrain: train again even if a cached model with the same recipe hash exists.
        recipe: the recipe (default: the packaged ``demo_recipe.yaml``).
        steps: override the recipe's training steps (tests); a non-default step count is part of
            the cache key, so it never shadows the real model.

    Returns:
        ``out_dir`` as a ``Path``.

    Raises:
        ConfigFileError: invalid packaged/explicit recipe.
        CheckpointError: ``out_dir`` cannot be written.
    """
    recipe = recipe or load_recipe()
    if steps is not None and steps != recipe.train.steps:
        recipe = recipe.model_copy(update={"train": recipe.train.model_copy(update={"steps": steps})})
    cache_dir = cache_root() / f"demo-{recipe.hash()}"
    stamp = _read_stamp(cache_dir)
    if retrain or stamp is None or stamp.get("recipe_hash") != recipe.hash():
        _train_into(cache_dir, recipe, steps)
    out_dir = Path(out_dir)
    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=out_dir.name + ".tmp-", dir=out_dir.parent))
        shutil.copytree(cache_dir, tmp, dirs_exist_ok=True)
        _replace_dir(tmp, out_dir)
    except OSError as err:
        raise CheckpointError(f"Cannot write the demo model to {out_dir}: {err}",
                              hint="Choose a writable --out directory.") from err
    return out_dir


@dataclass(frozen=True)
class DemoResult:
    """What ``moeharden demo`` did. ``to_dict()`` is the JSON form; ``summary()`` the console text."""

    out: Path
    model_dir: Path
    reused_cache: bool
    recipe_hash: str
    training: dict[str, Any]
    tasks: list[str] = field(default_factory=list)
    pipeline: Any = None          # moeharden.demo.pipeline.PipelineResult, unless model_only

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema": "moeharden.demo/1",
            "moeharden_version": __version__,
            "out": str(self.out),
            "model_dir": str(self.model_dir),
            "reused_cache": self.reused_cache,
            "recipe_hash": self.recipe_hash,
            "training": self.training,
            "tasks": self.tasks,
            "pipeline": None if self.pipeline is None else self.pipeline.to_dict(),
        }

    def summary(self) -> str:
        acc = ", ".join(f"{k} {v:.3f}" for k, v in self.training.get("accuracy", {}).items())
        how = "reused from cache" if self.reused_cache else f"trained in {self.training.get('train_seconds')} s"
        text = (f"[green]Demo model[/] ({how}, recipe {self.recipe_hash}) → {self.model_dir}\n"
                f"  held-out accuracy: {acc}\n"
                f"  tasks: {self.model_dir / TASK_FILE_NAME}")
        if self.pipeline is not None:
            text += "\n" + self.pipeline.summary()
        return text


def run_demo(out: Path, retrain: bool = False, model_only: bool = False) -> DemoResult:
    """Build or reuse the demo model into ``out/model``, then run scan → entangle → lock → verify
    and write the before/after report to ``out/report.html`` (see :mod:`moeharden.demo.pipeline`).

    Args:
        out: output directory of the demo run.
        retrain: train the demo model again even if cached.
        model_only: stop after the model (no pipeline).

    Returns:
        A :class:`DemoResult`.

    Raises:
        ConfigFileError, CheckpointError: see :func:`build_demo_model`.
    """
    recipe = load_recipe()
    cached = not retrain and _read_stamp(cache_root() / f"demo-{recipe.hash()}") is not None
    model_dir = build_demo_model(Path(out) / "model", retrain=retrain, recipe=recipe)
    stamp = _read_stamp(model_dir) or {}
    pipeline = None
    if not model_only:
        from moeharden.demo.pipeline import run_pipeline

        pipeline = run_pipeline(Path(out), model_dir)
    return DemoResult(out=Path(out), model_dir=model_dir, reused_cache=cached, recipe_hash=recipe.hash(),
                      training=stamp.get("training", {}), tasks=list(TASKS), pipeline=pipeline)
