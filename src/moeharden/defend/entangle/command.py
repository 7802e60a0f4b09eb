"""``moeharden entangle`` as a library call: load a checkpoint, entangle it, write the result.

:func:`entangle` is what the CLI calls: it validates the recipe and the output directory before
any expensive work, runs :func:`moeharden.defend.entangle.loop.entangle_model` with resumable
checkpoints, and writes an ordinary Hugging Face checkpoint plus ``entangle.json`` atomically.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict

from moeharden import __version__
from moeharden.defend.entangle.loop import entangle_model
from moeharden.defend.entangle.recipe import load_recipe
from moeharden.defend.entangle.resume import has_checkpoint
from moeharden.errors import UsageError

SCHEMA = "moeharden.entangle/1"


class EntangleResult(BaseModel):
    """What `entangle` returns: where the checkpoint is, whether it finished, the last losses."""

    model_config = ConfigDict(frozen=True)
    out: str | None
    steps_done: int
    completed: bool
    seconds: float
    last: dict[str, float] = {}

    def to_dict(self) -> dict:
        return self.model_dump()


def entangle(ckpt: str, out: Path, *, tasks: Sequence[str] | None = None, recipe_path: Path | None = None,
             overrides: dict[str, Any] | None = None, resume: bool = False, stop_after: int | None = None,
             checkpoint_dir: Path | None = None, limit: int | None = None,
             trust_remote_code: bool = False) -> EntangleResult:
    """Load a checkpoint, entangle it, and write an ordinary HF checkpoint plus ``entangle.json``.

    Args:
        ckpt: local checkpoint directory or Hub id.
        out: output directory (replaced only if empty or an earlier moeharden output).
        tasks: task specs (``None``: the checkpoint's own task file).
        recipe_path: a recipe YAML (``None``: the shipped default); overrides: recipe fields
            from the command line (``None`` values ignored).
        resume: continue from the training checkpoint in ``checkpoint_dir``.
        stop_after: stop after this many steps in total (the run is then not completed).
        checkpoint_dir: where training checkpoints go (default: a hidden sibling of ``out``).
        limit: cap on examples per split.
        trust_remote_code: let transformers run the checkpoint's own modeling code.
    Returns:
        :class:`EntangleResult` (``out`` is ``None`` unless the run completed).
    Raises:
        CheckpointError, UnsupportedModelError, TaskError, ConfigFileError, UsageError.
    """
    from moeharden.console import progress_bar
    from moeharden.io.outputs import atomic_output_dir, check_output_dir, copy_side_files
    from moeharden.model.checkpoint import checkpoint_digest, load_model, load_tokenizer, resolve_checkpoint
    from moeharden.tasks.resolve import load_tasks

    recipe = load_recipe(recipe_path, **(overrides or {}))
    check_output_dir(out)          # fail now, not after minutes of work
    src = resolve_checkpoint(ckpt)
    task_objs = load_tasks(list(tasks) if tasks else None, checkpoint_dir=src, limit=limit, seed=None)
    bad = [t.name for t in task_objs if t.kind not in ("multiple_choice", "generation", "perplexity")]
    if bad:
        raise UsageError(f"entangle trains on task files and presets; {', '.join(bad)} cannot be trained on.")
    ckpt_dir = Path(checkpoint_dir) if checkpoint_dir else Path(out).with_name(f".{Path(out).name}.entangle-ckpt")
    if resume and not has_checkpoint(ckpt_dir / "latest"):
        raise UsageError(f"--resume: no checkpoint found in {ckpt_dir}.",
                         hint="Run without --resume first, or pass --checkpoint-dir.")
    # under `accelerate launch` (several processes) accelerate places the model itself: no device_map
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    model = load_model(src, trust_remote_code=trust_remote_code, device_map="cpu" if distributed else None)
    tokenizer = load_tokenizer(src)
    t0 = time.perf_counter()
    with progress_bar("entangle", total=recipe.steps) as advance:
        history, done = entangle_model(model, tokenizer, task_objs, recipe, ckpt_dir=ckpt_dir, resume=resume,
                                       stop_after=stop_after, progress=advance)
    seconds = time.perf_counter() - t0
    completed = done >= recipe.steps
    last = {k: v for k, v in (history[-1] if history else {}).items() if k != "step"}
    if not completed:
        return EntangleResult(out=None, steps_done=done, completed=False, seconds=seconds, last=last)
    if distributed and int(os.environ.get("RANK", "0")) != 0:
        return EntangleResult(out=str(out), steps_done=done, completed=True, seconds=seconds, last=last)
    with atomic_output_dir(out) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        copy_side_files(src, tmp, trust_remote_code=trust_remote_code)   # task file and data, model card
        (tmp / "entangle.json").write_text(json.dumps({
            "schema": SCHEMA, "tool": {"name": "moeharden", "version": __version__},
            "source": {"path": str(src), "safetensors_digest": checkpoint_digest(src)},
            "tasks": [t.name for t in task_objs], "recipe": recipe.model_dump(mode="json"),
            "history": history, "seconds": round(seconds, 2)}, indent=2) + "\n")
    shutil.rmtree(ckpt_dir, ignore_errors=True)
    return EntangleResult(out=str(out), steps_done=done, completed=True, seconds=seconds, last=last)
