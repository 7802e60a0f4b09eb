"""``moeharden entangle`` as a library call: load a checkpoint, entangle it, write the result.

:func:`entangle` is what the CLI calls, with one :class:`EntangleSettings` (validated when it is
built, so that a bad option fails before anything is read or written): it loads the recipe with the
settings' overrides, checks the output directory before any expensive work, runs
:func:`moeharden.defend.entangle.loop.entangle_model` with resumable checkpoints, and writes an
ordinary Hugging Face checkpoint plus ``entangle.json``
(:class:`~moeharden.defend.entangle.record.EntangleRecord`) atomically.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError

from moeharden.defend.entangle.loop import entangle_model
from moeharden.defend.entangle.recipe import EntangleRecipe, load_recipe
from moeharden.defend.entangle.record import ENTANGLE_RECORD, EntangleRecord
from moeharden.defend.entangle.resume import check_checkpoint_dir, has_checkpoint, remove_checkpoint_dir
from moeharden.errors import InputError, UsageError, validation_problems

# the recipe fields the command line may override (each an EntangleSettings field; None = the recipe's value)
RECIPE_OVERRIDES = ("steps", "lr", "batch_size", "lambda_retain", "lambda_prune", "lambda_spread",
                    "recovery_term", "mixed_precision", "grad_accum", "checkpoint_every", "seed")


@dataclass(frozen=True)
class EntangleSettings:
    """Everything ``entangle`` needs besides the checkpoint; every option is checked when this is built.

    The recipe-override fields (:data:`RECIPE_OVERRIDES`) are ``None`` unless given on the command
    line; precedence is command line > recipe file > defaults, decided by ``None`` (an override of
    ``0.0`` or ``False`` stands).

    Attributes:
        out: output directory (replaced only if empty or an earlier moeharden output).
        tasks: task specs (``None``: the checkpoint's own task file).
        recipe_path: a recipe YAML (``None``: the shipped default).
        resume: continue from the training checkpoint in ``checkpoint_dir`` (refused when another
            run wrote it).
        resume_if_same: continue from that checkpoint when this very run (the same weights,
            tasks, recipe, processes) wrote it, and start again otherwise (the demo).
        keep_checkpoint: leave the last training checkpoint after writing ``out``: a run again
            with ``resume_if_same`` then only writes the output (the demo removes it at its end).
        stop_after: stop after this many steps in total (the run is then not completed).
        checkpoint_dir: where training checkpoints go (default: a hidden sibling of ``out``); never
            ``out``, inside it or holding it (publishing the output would replace or delete the
            checkpoints, or carry them), nor inside the input checkpoint (:meth:`check_paths`).
        limit: cap on examples per split.
        trust_remote_code: let transformers run the checkpoint's own modeling code.
    Raises:
        UsageError: an override outside its recipe field's range or choices (``--steps 0``,
            ``--mixed-precision fp8``), or ``stop_after`` / ``limit`` below 1.
        InputError: a ``checkpoint_dir`` that is, lies inside or holds ``out``.
    """

    out: Path
    tasks: tuple[str, ...] | None = None
    recipe_path: Path | None = None
    steps: int | None = None
    lr: float | None = None
    batch_size: int | None = None
    lambda_retain: float | None = None
    lambda_prune: float | None = None
    lambda_spread: float | None = None
    recovery_term: bool | None = None
    mixed_precision: str | None = None
    grad_accum: int | None = None
    checkpoint_every: int | None = None
    seed: int | None = None
    resume: bool = False
    resume_if_same: bool = False     # resume only a checkpoint of this very run, else start again (the demo)
    keep_checkpoint: bool = False    # leave the last checkpoint after writing out (the demo removes it at its end)
    stop_after: int | None = None
    checkpoint_dir: Path | None = None
    limit: int | None = None
    trust_remote_code: bool = False
    self_check: bool = True      # verify the family adapter on a tiny random model first

    def __post_init__(self) -> None:
        object.__setattr__(self, "out", Path(self.out))
        if self.tasks is not None:
            object.__setattr__(self, "tasks", tuple(self.tasks) or None)
        try:        # each override against its recipe field's type and range (the other fields at defaults)
            EntangleRecipe(**self.overrides())
        except ValidationError as err:
            lines = []
            for line in validation_problems(err):         # "lr: Input should be greater than 0 (got -1.0)"
                field, _, problem = line.partition(": ")
                lines.append(f"--{field.replace('_', '-')}: {problem}")
            raise UsageError(f"Bad entangle option(s): {'; '.join(lines)}.",
                             hint="See src/moeharden/data/entangle_recipe.yaml for each knob.") from None
        for flag, value in (("stop_after", self.stop_after), ("--limit", self.limit)):
            if value is not None and value < 1:
                raise UsageError(f"{flag} must be at least 1 (got {value}).")
        if self.checkpoint_dir is not None:
            object.__setattr__(self, "checkpoint_dir", Path(self.checkpoint_dir))
            c, o = self.checkpoint_dir.resolve(), self.out.resolve()
            if c == o or o in c.parents or c in o.parents:
                raise InputError(f"--checkpoint-dir {self.checkpoint_dir} is, lies inside or holds --out {self.out}; "
                                 "publishing the output would replace or delete the training checkpoints.",
                                 hint="Choose a --checkpoint-dir outside --out, or leave it out (the default is "
                                      f"the hidden sibling .{self.out.name}.entangle-ckpt).")

    def check_paths(self, ckpt: str | Path) -> None:
        """Refuse a ``checkpoint_dir`` inside the input checkpoint ``ckpt`` (writing there would change
        the model being read); call it before any work, and again with the resolved checkpoint.

        Raises:
            InputError: ``checkpoint_dir`` is or lies inside ``ckpt`` (links resolved).
        """
        p = Path(ckpt)
        if self.checkpoint_dir is None or not (p.exists() or p.is_symlink()):
            return                                           # the default sibling, or a Hub id
        c, q = self.checkpoint_dir.resolve(), p.resolve()
        if c == q or q in c.parents:
            raise InputError(f"--checkpoint-dir {self.checkpoint_dir} lies inside the input checkpoint {ckpt}; "
                             "writing there would change the model being read.",
                             hint="Choose a --checkpoint-dir outside the checkpoint, or leave it out.")

    def overrides(self) -> dict[str, Any]:
        """The recipe fields given on the command line (those that are not ``None``)."""
        return {k: v for k in RECIPE_OVERRIDES if (v := getattr(self, k)) is not None}

    def recipe(self) -> EntangleRecipe:
        """Default recipe < recipe file < these overrides (:func:`~moeharden.defend.entangle.recipe.load_recipe`).

        Raises:
            ConfigFileError: an unreadable or invalid recipe file.
        """
        return load_recipe(self.recipe_path, **self.overrides())


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


def entangle(ckpt: str, settings: EntangleSettings) -> EntangleResult:
    """Load a checkpoint, entangle it, and write an ordinary HF checkpoint plus ``entangle.json``.

    Args:
        ckpt: local checkpoint directory or Hub id.
        settings: output, tasks, recipe and its overrides, resumption (:class:`EntangleSettings`).
    Returns:
        :class:`EntangleResult` (``out`` is ``None`` unless the run completed).
    Raises:
        CheckpointError, UnsupportedModelError, TaskError, ConfigFileError, UsageError, InputError
        (``out`` not replaceable, ``checkpoint_dir`` inside the checkpoint).
    """
    from moeharden.console import progress_bar
    from moeharden.io.outputs import atomic_output_dir, check_output_dir
    from moeharden.io.ranks import current
    from moeharden.io.records import SourceRef, tool_info
    from moeharden.io.sidefiles import copy_side_files
    from moeharden.model.adapter_check import AdapterCheck
    from moeharden.model.checkpoint import (
        checkpoint_digest,
        load_config,
        quiet_transformers,
        resolve_checkpoint,
    )

    out, resume = settings.out, settings.resume
    settings.check_paths(ckpt)
    recipe = settings.recipe()
    inputs = [p for p in (ckpt, settings.recipe_path) if p is not None]
    check_output_dir(out, kind="entangle", inputs=inputs)          # fail now, not after minutes of work
    src = resolve_checkpoint(ckpt)
    settings.check_paths(src)                   # a Hub id's snapshot, or a local path through a link
    with AdapterCheck(load_config(src), enabled=settings.self_check) as check:   # beside loading tasks and model
        task_objs, model, tokenizer, ckpt_dir = _prepare(src, out, settings)
        check.wait()                            # before training writes anything
    ranks = current()
    t0 = time.perf_counter()
    with progress_bar("entangle", total=recipe.steps) as advance:
        history, done = entangle_model(model, tokenizer, task_objs, recipe, ckpt_dir=ckpt_dir, resume=resume,
                                       resume_if_same=settings.resume_if_same, stop_after=settings.stop_after,
                                       progress=advance)
    seconds = time.perf_counter() - t0
    completed = done >= recipe.steps
    last = {k: v for k, v in (history[-1] if history else {}).items() if k != "step"}
    if not completed:
        return EntangleResult(out=None, steps_done=done, completed=False, seconds=seconds, last=last)
    if not ranks.main:
        return EntangleResult(out=str(out), steps_done=done, completed=True, seconds=seconds, last=last)
    with atomic_output_dir(out, kind="entangle", inputs=[src, *inputs[1:]]) as tmp:
        with quiet_transformers():
            model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        copy_side_files(src, tmp, trust_remote_code=settings.trust_remote_code)   # task file and data, card
        source = SourceRef(path=str(src), safetensors_digest=checkpoint_digest(src))
        record = EntangleRecord(tool=tool_info(), source=source,
                                tasks=[t.name for t in task_objs], recipe=recipe.model_dump(mode="json"),
                                history=history, seconds=round(seconds, 2))
        (tmp / ENTANGLE_RECORD).write_text(record.to_file_text())
    if not settings.keep_checkpoint:
        remove_checkpoint_dir(ckpt_dir)         # only a directory moeharden claimed for checkpoints
    return EntangleResult(out=str(out), steps_done=done, completed=True, seconds=seconds, last=last)


def _prepare(src, out, settings):
    """Tasks, model, tokenizer and the resume directory of an entangle run (nothing written)."""
    from moeharden.io.ranks import current
    from moeharden.model.checkpoint import load_model, load_tokenizer
    from moeharden.tasks.resolve import load_tasks

    task_objs = load_tasks(list(settings.tasks) if settings.tasks else None, checkpoint_dir=src,
                           limit=settings.limit, seed=None)
    bad = [t.name for t in task_objs if t.kind not in ("multiple_choice", "generation", "perplexity")]
    if bad:
        raise UsageError(f"entangle trains on task files and presets; {', '.join(bad)} cannot be trained on.")
    ckpt_dir = (Path(settings.checkpoint_dir) if settings.checkpoint_dir
                else out.with_name(f".{out.name}.entangle-ckpt"))
    check_checkpoint_dir(ckpt_dir)      # fail now, before the model loads (claimed when training starts)
    if settings.resume and not has_checkpoint(ckpt_dir / "latest"):
        raise UsageError(f"--resume: no checkpoint found in {ckpt_dir}.",
                         hint="Run without --resume first, or pass --checkpoint-dir.")
    # under `accelerate launch` (several processes) accelerate places the model itself: no device_map
    distributed = current().size > 1
    model = load_model(src, trust_remote_code=settings.trust_remote_code, device_map="cpu" if distributed else None)
    tokenizer = load_tokenizer(src)
    return task_objs, model, tokenizer, ckpt_dir
