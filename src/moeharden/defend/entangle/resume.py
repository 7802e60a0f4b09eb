"""Resumable training checkpoints of ``entangle``: weights, optimizer state, keep-set pools, history.

A checkpoint is a directory ``model.safetensors`` + ``optimizer.safetensors`` (tensors only, no
pickle) + ``state.json`` (step, loss history, pools, optimizer param groups), written atomically.
Per-step randomness is derived from (seed, step), so a resumed run gives the same weights as an
uninterrupted one.

The checkpoint directory (``--checkpoint-dir``) is claimed with the ``.moeharden-output`` marker
before the first step (:func:`claim_checkpoint_dir`): a directory that holds anything moeharden did
not write is refused, and only a claimed directory is ever removed (:func:`remove_checkpoint_dir`).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from moeharden.errors import InputError
from moeharden.io.outputs import OUTPUT_MARKER


def claim_checkpoint_dir(ckpt_dir: Path) -> None:
    """Make ``ckpt_dir`` moeharden's own: create it (or adopt it when empty) and mark it.

    Raises:
        InputError: ``ckpt_dir`` is a file, or a non-empty directory moeharden did not write.
    """
    ckpt_dir = Path(ckpt_dir)
    if ckpt_dir.exists() and not ckpt_dir.is_dir():
        raise InputError(f"Checkpoint directory {ckpt_dir} exists and is not a directory.",
                         hint="Choose another --checkpoint-dir.")
    if ckpt_dir.is_dir() and not (ckpt_dir / OUTPUT_MARKER).is_file() and any(ckpt_dir.iterdir()):
        raise InputError(f"Checkpoint directory {ckpt_dir} is not empty and was not written by moeharden; "
                         "refusing to write into it (it would be deleted at the end).",
                         hint="Choose a new or empty --checkpoint-dir.")
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    (ckpt_dir / OUTPUT_MARKER).write_text(json.dumps({"tool": "moeharden", "kind": "entangle-checkpoints"}) + "\n")


def remove_checkpoint_dir(ckpt_dir: Path) -> bool:
    """Remove ``ckpt_dir`` only if it carries moeharden's marker; returns whether it was removed."""
    ckpt_dir = Path(ckpt_dir)
    if not (ckpt_dir.is_dir() and (ckpt_dir / OUTPUT_MARKER).is_file()):
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

    tmp = temp_sibling(ckpt_dir)
    save_model(model, str(tmp / "model.safetensors"))
    osd = opt.state_dict()
    tensors = {f"{i}.{k}": v.detach().cpu().contiguous() for i, st in osd["state"].items() for k, v in st.items()
               if torch.is_tensor(v)}
    save_file(tensors, str(tmp / "optimizer.safetensors"))
    (tmp / "state.json").write_text(json.dumps({**state, "param_groups": osd["param_groups"]}))
    replace_dir(tmp, ckpt_dir)          # the previous checkpoint stays until this one is in place


def load_checkpoint(ckpt_dir: Path, model, opt) -> dict:
    """Load weights and optimizer state in place; returns the loop state (pools with int layer keys)."""
    from safetensors.torch import load_file, load_model

    load_model(model, str(ckpt_dir / "model.safetensors"))
    state = json.loads((ckpt_dir / "state.json").read_text())
    flat = load_file(str(ckpt_dir / "optimizer.safetensors"))
    per: dict[int, dict[str, torch.Tensor]] = {}
    for key, v in flat.items():
        i, name = key.split(".", 1)
        per.setdefault(int(i), {})[name] = v
    opt.load_state_dict({"state": per, "param_groups": state.pop("param_groups")})
    for pool in ("attr_pool", "adv_pool"):          # JSON object keys are strings; layers are ints
        state[pool] = {t: [{int(k): v for k, v in ks.items()} for ks in sets] for t, sets in state[pool].items()}
    return state


def checkpoint_run(ckpt_dir: Path) -> str | None:
    """The run fingerprint a checkpoint was written under (:func:`run_fingerprint`); ``None`` when
    it has none (written before fingerprints) or cannot be read."""
    try:
        state = json.loads((Path(ckpt_dir) / "state.json").read_text())
    except (OSError, ValueError):
        return None
    run = state.get("run") if isinstance(state, dict) else None
    return run if isinstance(run, str) else None


def run_fingerprint(model, tokenizer, tasks, recipe, world_size: int) -> str:
    """What an entangle run's result depends on, as one sha256: the starting weights (every
    tensor's bytes), the tokenizer, the tasks' examples, the recipe, the number of processes and
    the versions of moeharden, torch and transformers. A checkpoint is resumed only under the
    same fingerprint."""
    from moeharden.model.checkpoint import run_inputs_sha256

    return run_inputs_sha256(model, tokenizer, tasks, recipe=recipe.model_dump(mode="json"), world_size=world_size)


def has_checkpoint(ckpt_dir: Path) -> bool:
    """Whether ``ckpt_dir`` holds a checkpoint (directories are swapped in whole, so one found is complete)."""
    return (Path(ckpt_dir) / "state.json").exists()
