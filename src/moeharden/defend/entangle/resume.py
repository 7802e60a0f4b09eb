"""Resumable training checkpoints of ``entangle``: weights, optimizer state, keep-set pools, history.

A checkpoint is a directory ``model.safetensors`` + ``optimizer.safetensors`` (tensors only, no
pickle) + ``state.json`` (step, loss history, pools, optimizer param groups), written atomically.
Per-step randomness is derived from (seed, step), so a resumed run gives the same weights as an
uninterrupted one.

The checkpoint directory (``--checkpoint-dir``) is claimed with the ``.moeharden-output`` marker
before the first step (:func:`claim_checkpoint_dir`): a directory that holds anything moeharden did
not write, another moeharden output (a release, a pruned model), or is a symbolic link is refused,
and only a directory carrying a checkpoint marker is ever removed (:func:`remove_checkpoint_dir`).

A checkpoint is data like any input (:func:`load_checkpoint`): its files must be regular files
inside the directory (never followed through a link), ``state.json`` is read bounded and validated,
and the safetensors headers are checked against this run's model and optimizer, all before a
single tensor is loaded, so a damaged checkpoint is a :class:`~moeharden.errors.CheckpointError`
and leaves the model untouched.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
from collections.abc import Collection
from pathlib import Path

import torch
from pydantic import BaseModel, ConfigDict, Field, StrictInt, ValidationError

from moeharden.errors import CheckpointError, InputError, MoehardenError, validation_problems
from moeharden.io.outputs import OUTPUT_MARKER, marker_kind

CHECKPOINT_FILES = ("model.safetensors", "optimizer.safetensors", "state.json")
MARKER_KIND = "entangle-checkpoints"
RESUME_HINT = ("Run without --resume to start again (the checkpoint is then replaced), or pass the "
               "--checkpoint-dir of this run.")


def _is_checkpoint_marker(marker: Path) -> bool:
    """Whether ``marker`` is the marker :func:`claim_checkpoint_dir` writes, not that of another
    moeharden output."""
    return marker_kind(marker) == MARKER_KIND


def claim_checkpoint_dir(ckpt_dir: Path) -> None:
    """Make ``ckpt_dir`` moeharden's own: create it (or adopt it when empty) and mark it.

    Raises:
        InputError: as :func:`check_checkpoint_dir`.
    """
    ckpt_dir = Path(ckpt_dir)
    check_checkpoint_dir(ckpt_dir)
    marker = ckpt_dir / OUTPUT_MARKER
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    if not os.path.lexists(marker):      # never written through a link
        fd = os.open(marker, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o644)
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps({"tool": "moeharden", "kind": MARKER_KIND}) + "\n")


def check_checkpoint_dir(ckpt_dir: Path) -> None:
    """Fail early (nothing written) when ``ckpt_dir`` is not moeharden's checkpoint directory to use.

    Raises:
        InputError: ``ckpt_dir`` is a file or a symbolic link, a non-empty directory moeharden did
            not write, or another moeharden output (its marker is not a checkpoint directory's).
    """
    ckpt_dir = Path(ckpt_dir)
    if ckpt_dir.is_symlink():
        raise InputError(f"Checkpoint directory {ckpt_dir} is a symbolic link; refusing to write checkpoints "
                         "through it (the directory is deleted at the end).",
                         hint="Pass the directory it points to, or choose another --checkpoint-dir.")
    if ckpt_dir.exists() and not ckpt_dir.is_dir():
        raise InputError(f"Checkpoint directory {ckpt_dir} exists and is not a directory.",
                         hint="Choose another --checkpoint-dir.")
    marker = ckpt_dir / OUTPUT_MARKER
    if ckpt_dir.is_dir():
        if os.path.lexists(marker):
            if not _is_checkpoint_marker(marker):
                raise InputError(f"Checkpoint directory {ckpt_dir} holds another moeharden output (or a "
                                 f"{OUTPUT_MARKER} moeharden did not write); refusing to write into it (it "
                                 "would be deleted at the end).", hint="Choose a new or empty --checkpoint-dir.")
        elif any(ckpt_dir.iterdir()):
            raise InputError(f"Checkpoint directory {ckpt_dir} is not empty and was not written by moeharden; "
                             "refusing to write into it (it would be deleted at the end).",
                             hint="Choose a new or empty --checkpoint-dir.")


def remove_checkpoint_dir(ckpt_dir: Path) -> bool:
    """Remove ``ckpt_dir`` only if it is a directory (not a link) carrying a checkpoint directory's
    marker; returns whether it was removed."""
    ckpt_dir = Path(ckpt_dir)
    if ckpt_dir.is_symlink() or not (ckpt_dir.is_dir() and _is_checkpoint_marker(ckpt_dir / OUTPUT_MARKER)):
        return False
    shutil.rmtree(ckpt_dir, ignore_errors=True)
    return True


def save_checkpoint(ckpt_dir: Path, model, opt, state: dict) -> None:
    """Atomically write weights, optimizer state and loop state for ``--resume``.

    Args:
        ckpt_dir: the checkpoint directory (replaced as a whole).
        model: the unwrapped model; opt: its optimizer.
        state: JSON-serialisable loop state (``step``, ``history``, ``attr_pool``, ``adv_pool``).
    """
    from safetensors.torch import save_file, save_model

    from moeharden.io.outputs import replace_dir, temp_sibling

    ckpt_dir = Path(ckpt_dir)
    if ckpt_dir.is_symlink():      # inside the claimed directory: a link there is dropped, never written through
        ckpt_dir.unlink()
    tmp = temp_sibling(ckpt_dir)
    save_model(model, str(tmp / "model.safetensors"))
    osd = opt.state_dict()
    tensors = {f"{i}.{k}": v.detach().cpu().contiguous() for i, st in osd["state"].items() for k, v in st.items()
               if torch.is_tensor(v)}
    save_file(tensors, str(tmp / "optimizer.safetensors"))
    (tmp / "state.json").write_text(json.dumps({**state, "param_groups": osd["param_groups"]}))
    replace_dir(tmp, ckpt_dir)          # the previous checkpoint stays until this one is in place


class _LoopState(BaseModel):
    """What ``state.json`` must hold for the loop (optimizer param groups are this run's own)."""

    model_config = ConfigDict(extra="ignore")
    step: StrictInt = Field(ge=0)
    history: list[dict[str, float | int | str | None]]
    attr_pool: dict[str, list[dict[int, list[int]]]]
    adv_pool: dict[str, list[dict[int, list[int]]]]


def _damaged(latest: Path, problem: str) -> CheckpointError:
    return CheckpointError(f"The training checkpoint {latest} cannot be resumed: {problem}.", hint=RESUME_HINT)


def read_state(latest: Path) -> dict:
    """The ``state.json`` object of the checkpoint ``latest``, read without following links and bounded.

    Raises:
        CheckpointError: ``latest`` or one of its files is a link, missing or not a regular file, or
            ``state.json`` is not a JSON object.
    """
    from moeharden.io.files import read_json_object

    latest = Path(latest)
    if latest.is_symlink() or not latest.is_dir():
        raise _damaged(latest, "it is a symbolic link or not a directory (a checkpoint's files must lie inside "
                               "--checkpoint-dir)")
    for name in CHECKPOINT_FILES:
        try:
            mode = os.lstat(latest / name).st_mode
        except FileNotFoundError:
            raise _damaged(latest, f"{name} is missing") from None
        if stat.S_ISLNK(mode):
            raise _damaged(latest, f"{name} is a symbolic link (a checkpoint's files must lie inside "
                                   "--checkpoint-dir)")
        if not stat.S_ISREG(mode):
            raise _damaged(latest, f"{name} is not a regular file")
    try:
        return read_json_object(latest / "state.json", what="training state", error=CheckpointError)
    except CheckpointError as err:
        raise _damaged(latest, err.message.rstrip(".")) from None


def _check_state(latest: Path, raw: dict, *, steps: int, layers: list[int], num_experts: int,
                 tasks: Collection[str]) -> dict:
    """``raw`` validated for a run of ``steps`` steps on this model's MoE ``layers`` and ``tasks``."""
    try:
        st = _LoopState.model_validate(raw)
    except ValidationError as err:
        raise _damaged(latest, "its state.json is invalid (" + "; ".join(validation_problems(err)[:5]) + ")") from None
    if st.step > steps:
        raise _damaged(latest, f"it records step {st.step} of a run of {steps} steps")
    if len(st.history) != st.step or any(row.get("step") != i + 1 for i, row in enumerate(st.history)):
        raise _damaged(latest, f"its loss history does not hold one row per step 1..{st.step}")
    for pool in (st.attr_pool, st.adv_pool):
        for task, sets in pool.items():
            if task not in tasks:
                raise _damaged(latest, f"its keep-set pools name a task {task!r} this run does not train on")
            for ks in sets:
                counts = {len(v) for v in ks.values()}
                if (set(ks) != set(layers) or len(counts) != 1 or 0 in counts
                        or any(len(set(v)) != len(v) or not all(0 <= e < num_experts for e in v)
                               for v in ks.values())):
                    raise _damaged(latest, f"a keep-set of task {task!r} is not one of this model's "
                                           f"({len(layers)} MoE layers, {num_experts} experts)")
    return st.model_dump()


def _header(latest: Path, name: str) -> dict:
    from moeharden.io.shards import read_header

    try:
        header, _ = read_header(latest / name)
    except CheckpointError as err:
        raise _damaged(latest, err.message.rstrip(".")) from None
    return {k: v for k, v in header.items() if k != "__metadata__"}


def _check_model_file(latest: Path, model) -> None:
    """Every tensor of ``model.safetensors`` is one of ``model``'s, of its shape and dtype, and every
    tensor of ``model`` is there or shares its storage with one that is (tied weights)."""
    from moeharden.io.shards import torch_dtype

    header, sd = _header(latest, "model.safetensors"), model.state_dict()
    for k, meta in header.items():
        if k not in sd or meta["shape"] != list(sd[k].shape) or torch_dtype(meta["dtype"]) != sd[k].dtype:
            raise _damaged(latest, f"model.safetensors holds a tensor {k!r} that is not this model's "
                                   "(name, shape or dtype)")
    saved = {sd[k].untyped_storage().data_ptr() for k in header}
    missing = [k for k in sd if k not in header and sd[k].untyped_storage().data_ptr() not in saved]
    if missing:
        raise _damaged(latest, f"model.safetensors lacks {len(missing)} of the model's tensors ({missing[0]!r}, ...)")


def _check_optimizer_file(latest: Path, opt) -> None:
    """``optimizer.safetensors`` holds AdamW state (``step``, moments) of this optimizer's parameters only,
    each complete and shaped like its parameter."""
    from moeharden.io.shards import torch_dtype

    params = [p for g in opt.param_groups for p in g["params"]]
    names = {"step", "exp_avg", "exp_avg_sq"} | ({"max_exp_avg_sq"} if any(g.get("amsgrad") for g in
                                                                          opt.param_groups) else set())
    seen: dict[int, set[str]] = {}
    for key, meta in _header(latest, "optimizer.safetensors").items():
        i, _, name = key.partition(".")
        ok = i.isascii() and i.isdigit() and int(i) < len(params) and name in names
        dtype = torch_dtype(meta["dtype"])
        if not (ok and dtype is not None and dtype.is_floating_point
                and meta["shape"] == ([] if name == "step" else list(params[int(i)].shape))):
            raise _damaged(latest, f"optimizer.safetensors holds an entry {key!r} that is not this optimizer's state")
        seen.setdefault(int(i), set()).add(name)
    if any(got != names for got in seen.values()):
        raise _damaged(latest, "optimizer.safetensors holds an incomplete parameter state")


def load_checkpoint(ckpt_dir: Path, model, opt, *, steps: int, layers: list[int], num_experts: int,
                    tasks: Collection[str]) -> dict:
    """Load weights and optimizer state in place; returns the loop state (pools with int layer keys).

    Everything is checked before anything is loaded (:func:`read_state`; the state against a run of
    ``steps`` steps on MoE ``layers`` with ``num_experts`` experts and ``tasks``; both safetensors
    headers against ``model`` and ``opt``), so a ``CheckpointError`` leaves both untouched. The
    optimizer's param groups (hyperparameters) are this run's own: the recipe decides them (the
    run's fingerprint covers it) and the schedule's replay sets the learning rate.

    Raises:
        CheckpointError: a damaged, foreign or linked checkpoint (see above).
    """
    from safetensors.torch import load_file, load_model

    ckpt_dir = Path(ckpt_dir)
    state = _check_state(ckpt_dir, read_state(ckpt_dir), steps=steps, layers=layers, num_experts=num_experts,
                         tasks=tasks)
    _check_model_file(ckpt_dir, model)
    _check_optimizer_file(ckpt_dir, opt)
    load_model(model, str(ckpt_dir / "model.safetensors"))
    flat = load_file(str(ckpt_dir / "optimizer.safetensors"))
    per: dict[int, dict[str, torch.Tensor]] = {}
    for key, v in flat.items():
        i, name = key.split(".", 1)
        per.setdefault(int(i), {})[name] = v
    opt.load_state_dict({"state": per, "param_groups": opt.state_dict()["param_groups"]})
    return state


def checkpoint_run(ckpt_dir: Path) -> str | None:
    """The run fingerprint a checkpoint was written under (:func:`run_fingerprint`); ``None`` when
    it has none (written before fingerprints) or cannot be read (:func:`read_state`)."""
    try:
        state = read_state(Path(ckpt_dir))
    except (MoehardenError, OSError):
        return None
    run = state.get("run")
    return run if isinstance(run, str) else None


def run_fingerprint(model, tokenizer, tasks, recipe, world_size: int) -> str:
    """What an entangle run's result depends on, as one sha256: the starting weights (every
    tensor's bytes), the tokenizer, the tasks' examples, the recipe, the number of processes and
    the versions of moeharden, torch and transformers. A checkpoint is resumed only under the
    same fingerprint."""
    from moeharden.model.checkpoint import run_inputs_sha256

    return run_inputs_sha256(model, tokenizer, tasks, recipe=recipe.model_dump(mode="json"), world_size=world_size)


def has_checkpoint(ckpt_dir: Path) -> bool:
    """Whether ``ckpt_dir`` holds a checkpoint (directories are swapped in whole, so one found is complete;
    a link found there counts, so that ``--resume`` says what is wrong with it)."""
    return os.path.lexists(Path(ckpt_dir) / "state.json")
