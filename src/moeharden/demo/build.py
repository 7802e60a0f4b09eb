"""Building the embedded demo model: a tiny task-specialised Mixtral MoE, trained on CPU and cached.

:func:`build_demo_model` trains the model of :mod:`moeharden.demo.train` on the synthetic tasks of
:mod:`moeharden.demo.synthetic` (or reuses the cached copy whose recipe hash matches) and copies it
into a directory laid out like any Hub checkpoint::

    config.json, generation_config.json, model.safetensors      # MixtralForCausalLM
    tokenizer.json, tokenizer_config.json                       # AutoTokenizer loads it
    moeharden-tasks.yaml, tasks/<name>.jsonl                    # task file (data only)
    moeharden-demo-recipe.json                                  # recipe + measured training stats

The cache lives in ``$MOEHARDEN_CACHE/demo-<hash>`` or ``~/.cache/moeharden/demo-<hash>``
(``$XDG_CACHE_HOME`` respected). Processes sharing a cache (parallel test workers, two demo runs)
take a file lock beside the entry, so one trains while the others wait and then reuse its model.
The whole ``moeharden demo`` run on top of it is :func:`moeharden.demo.pipeline.run_demo`.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from moeharden import __version__
from moeharden.demo.synthetic import TASK_FILE_NAME, TASKS, generate, write_rows, write_task_file
from moeharden.demo.train import DemoRecipe, load_recipe
from moeharden.errors import CheckpointError
from moeharden.io.cache import cache_root
from moeharden.io.outputs import atomic_output_dir, replace_dir, temp_sibling

RECIPE_FILE_NAME = "moeharden-demo-recipe.json"
RECIPE_SCHEMA = "moeharden.demo-recipe/1"


def read_stamp(model_dir: Path) -> dict[str, Any] | None:
    """The recipe stamp of a complete demo model directory; ``None`` if it is missing or incomplete."""
    try:
        stamp = json.loads((model_dir / RECIPE_FILE_NAME).read_text("utf-8"))
    except (OSError, ValueError):
        return None
    complete = all((model_dir / f).is_file() for f in ("config.json", "model.safetensors", "tokenizer.json",
                                                        TASK_FILE_NAME))
    return stamp if complete else None


@contextmanager
def _cache_lock(cache_dir: Path) -> Iterator[None]:
    """Hold an exclusive lock on the cache entry ``cache_dir`` (a ``.lock`` file beside it).

    Two processes that miss the cache at once would otherwise both train, and one could swap the
    entry away while the other copies from it. The lock is advisory (``flock``) and released by the
    kernel if the holder dies; where ``fcntl`` does not exist (Windows) entries are still written
    atomically, only not deduplicated.
    """
    cache_dir.parent.mkdir(parents=True, exist_ok=True)
    with open(cache_dir.with_name(cache_dir.name + ".lock"), "a") as fh:
        try:
            import fcntl
        except ImportError:  # pragma: no cover - not POSIX
            yield
            return
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def _train_into(cache_dir: Path, recipe: DemoRecipe, steps: int | None) -> None:
    from moeharden.console import progress_bar
    from moeharden.demo.train import train_demo
    from moeharden.model.checkpoint import quiet_transformers

    tmp = temp_sibling(cache_dir)
    try:
        heldout = write_task_file(tmp, recipe.data.rows_per_task, recipe.data.split)
        total = recipe.train.steps if steps is None else steps
        with progress_bar("Training the demo MoE", total=total) as advance:
            model, tok, stats = train_demo(recipe, heldout, steps=steps, progress=advance)
        with quiet_transformers():
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
        replace_dir(tmp, cache_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def build_demo_model(out_dir: Path, *, retrain: bool = False, recipe: DemoRecipe | None = None,
                     steps: int | None = None) -> Path:
    """Make the demo checkpoint available in ``out_dir`` (trained once, then reused from the cache).

    Args:
        out_dir: destination checkpoint directory, written atomically; an existing one is replaced
            only if it is empty or an earlier moeharden output (:func:`moeharden.io.outputs.check_output_dir`).
        retrain: train again even if a cached model with the same recipe hash exists.
        recipe: the recipe (default: the packaged ``demo_recipe.yaml``).
        steps: override the recipe's training steps (tests); a non-default step count is part of
            the cache key, so it never shadows the real model.

    Returns:
        ``out_dir`` as a ``Path``.

    Raises:
        ConfigFileError: invalid packaged/explicit recipe.
        InputError: ``out_dir`` holds data moeharden did not write.
        CheckpointError: ``out_dir`` cannot be written.
    """
    recipe = recipe or load_recipe()
    if steps is not None and steps != recipe.train.steps:
        recipe = recipe.model_copy(update={"train": recipe.train.model_copy(update={"steps": steps})})
    cache_dir = cache_root() / f"demo-{recipe.hash()}"
    out_dir = Path(out_dir)
    with _cache_lock(cache_dir):                 # held while training and while copying out of the cache
        stamp = read_stamp(cache_dir)
        if retrain or stamp is None or stamp.get("recipe_hash") != recipe.hash():
            _train_into(cache_dir, recipe, steps)
        try:
            with atomic_output_dir(out_dir, kind="demo-model") as tmp:
                shutil.copytree(cache_dir, tmp, dirs_exist_ok=True)
        except OSError as err:
            raise CheckpointError(f"Cannot write the demo model to {out_dir}: {err}",
                                  hint="Choose a writable --out directory.") from err
    return out_dir


OWNER_TRAIN_ROWS = 4096     # rows per task of the owner's training data that `entangle` trains on


def write_owner_tasks(out_dir: Path, *, recipe: DemoRecipe | None = None, train_rows: int = OWNER_TRAIN_ROWS) -> Path:
    """The release owner's own data for ``entangle``: a task file of the demo tasks over the first
    ``train_rows`` rows of the demo model's training pool (the same seeded stream, so never a
    held-out text of the checkpoint's task file), written atomically into ``out_dir``.

    The owner trained the model, so it holds far more than the few hundred rows of the checkpoint's
    ``train`` split (which stand for what an attacker can buy): on those alone the entangled model
    fits them and loses exact match on unseen sums (train 0.99, evaluation 0.90 on ``addition``).

    Returns:
        the task file's path (for ``entangle --task``).
    """
    from moeharden.io.outputs import atomic_output_dir

    recipe = recipe or load_recipe()
    d = recipe.data
    split = {"attribution": 128, "evaluation": 64, "train": train_rows, "seed": 0}
    rows = {}
    for name in TASKS:
        heldout = generate(name, d.rows_per_task, d.split["seed"], distinct=True)
        rows[name] = generate(name, sum(v for k, v in split.items() if k != "seed"), recipe.seed + 1,
                              exclude={r["text"] for r in heldout})
    with atomic_output_dir(Path(out_dir), kind="owner-data") as tmp:
        write_rows(tmp, rows, split)
    return Path(out_dir) / TASK_FILE_NAME
