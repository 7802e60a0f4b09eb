"""Cheap checks of a checkpoint directory before anything reads its weights (:func:`validate_checkpoint`).

Every file read by name lies inside the checkpoint and is regular, every name is UTF-8, the config
is there and sane, the weights are safetensors with sound headers, and the tensors agree with the
config and with each other (every MoE layer has its experts and a router, its experts stored alike).
"""

from __future__ import annotations

import itertools
import os
from pathlib import Path

from moeharden.errors import CheckpointError

_PICKLE = ("pytorch_model.bin", "*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl")


def validate_checkpoint(path: Path) -> None:
    """Cheap checks before loading: every file inside the checkpoint and regular, config present,
    safetensors present, headers sound, the config's expert count matching the tensors.

    Raises:
        CheckpointError: with a message naming what is wrong.
    """
    from moeharden.io.shards import CheckpointFiles

    if not path.is_dir():
        raise CheckpointError(f"{path} is not a directory.", hint="Pass the checkpoint directory, not a file.")
    _check_contained(path)
    if not (path / "config.json").is_file():
        raise CheckpointError(f"{path} has no config.json, so it is not a transformers checkpoint.",
                              hint="Point at the directory that holds config.json and the *.safetensors files.")
    _check_names(path)
    from moeharden.io.files import read_json_object

    read_json_object(path / "config.json", what="config", error=CheckpointError)   # an object, sanely nested
    if not list(path.glob("*.safetensors")) and not (path / "model.safetensors.index.json").exists():
        pickles = [p.name for pat in _PICKLE for p in path.glob(pat)]
        if pickles:
            raise CheckpointError(
                f"{path} holds only pickle weights ({', '.join(sorted(set(pickles)))}); moeharden reads safetensors only, "
                "because loading a pickle can run arbitrary code.",
                hint="Convert it where you trust it: model.save_pretrained(dir, safe_serialization=True).")
        raise CheckpointError(f"{path} has no *.safetensors weights.")
    files = CheckpointFiles(path)   # parses every header: truncated / corrupt / overlapping files fail here
    _check_config_against_tensors(path, files)


def _check_names(path: Path) -> None:
    """The checkpoint's path and every name in it are text (UTF-8): records, digests, signatures and
    manifests name them, and a name of undecodable bytes cannot be written into any of them.

    Raises:
        CheckpointError: the first such name (shown with its bad bytes escaped).
    """
    for n, p in enumerate(itertools.chain([path], path.rglob("*"))):
        if n > 100_000:                  # not a checkpoint's side files any more: stop looking
            break
        try:
            str(p).encode("utf-8")
        except UnicodeEncodeError:
            shown = os.fsencode(p).decode("utf-8", "backslashreplace")
            raise CheckpointError(f"'{shown}' is not a UTF-8 name; moeharden records every file of a checkpoint by "
                                  "name and cannot write this one.",
                                  hint="Rename it (or remove it from the checkpoint directory).") from None


# files transformers and moeharden open by name from a checkpoint (config, weights, tokenizer, tasks)
_READ_BY_NAME = ("*.json", "*.safetensors", "tokenizer*", "*.model", "vocab*", "merges*", "*.tiktoken", "*.jinja",
                 "moeharden-tasks.yaml")


def _check_contained(path: Path) -> None:
    """Every file of the checkpoint that is read by name lies inside it and is a regular file.

    transformers reads the config, tokenizer and generation files by name; a symlink among them
    that leads out of the checkpoint (``tokenizer.json -> ~/.ssh/id_rsa``) would be read, and a FIFO
    would block forever. Links are allowed inside the directory and, for a Hub cache snapshot, into
    its ``blobs`` folder. (Other side files are never read; :func:`moeharden.io.sidefiles.copy_side_files`
    leaves out those that are links out or not regular files.)

    Raises:
        CheckpointError: such a file is a link that leaves the checkpoint, or a FIFO, socket or device.
    """
    import stat

    from moeharden.io.sidefiles import allowed_roots

    roots = allowed_roots(path)
    for entry in sorted({p for pat in _READ_BY_NAME for p in path.glob(pat)}):
        if entry.is_symlink():
            real = entry.resolve()
            if not any(real.is_relative_to(r) for r in roots):
                raise CheckpointError(f"{entry} is a link to {real}, outside the checkpoint directory; "
                                      "refusing to read it.",
                                      hint="Do not trust this checkpoint, or copy the real file in.")
        if entry.exists() and not (stat.S_ISREG(entry.stat().st_mode) or entry.is_dir()):
            raise CheckpointError(f"{entry} is not a regular file (a FIFO, socket or device); refusing to "
                                  "read the checkpoint.", hint="Remove it from the checkpoint directory.")


def _check_config_against_tensors(path: Path, files) -> None:
    """The config's expert count against the tensors on disk, for a supported family.

    An unsupported family is left to the registry's own error when the model is used (the message
    that lists what is supported).

    Raises:
        CheckpointError: the config promises experts the tensors do not hold, or the reverse.
        UnsupportedModelError: an expert tensor whose shape disagrees with the config.
    """
    from moeharden.errors import UnsupportedModelError
    from moeharden.model.config import load_config
    from moeharden.model.disk import classify_tensors
    from moeharden.model.registry import num_experts, spec_for_config

    cfg = load_config(path)
    try:
        spec = spec_for_config(cfg)
        E = num_experts(cfg)
    except UnsupportedModelError:
        return
    roles = classify_tensors(spec, cfg, {name: info.shape for name, info in files.tensors.items()})
    check_experts_present(E, roles)
    check_layer_tensors(files, roles)


def check_layer_tensors(files, roles: dict) -> None:
    """Every MoE layer has a router the disk view recognises, and its experts are stored alike.

    A layer with experts but no router tensor of ``E`` (+ null) rows — e.g. a router whose header
    shape was rewritten to other dimensions of the same size — would be copied unpruned and
    signed unloadable; an expert stored in another dtype or shape than its siblings would too.

    Args:
        files: the checkpoint's :class:`~moeharden.io.shards.CheckpointFiles`.
        roles: ``{tensor name: TensorRole or None}`` from :func:`moeharden.model.disk.classify_tensors`.
    Raises:
        CheckpointError: a layer without a recognised router, or experts stored unalike.
    """
    from moeharden.model.disk import expert_slot

    expert_layers, router_layers = set(), set()
    alike: dict[tuple[int, str], tuple[str, str, tuple]] = {}
    for name, role in roles.items():
        if role is None:
            continue
        if role.kind == "router":
            router_layers.add(role.layer)
        if role.kind != "expert":
            continue
        expert_layers.add(role.layer)
        if role.expert is None:
            continue
        info = files.tensors[name]
        key = (role.layer, expert_slot(name))
        seen = alike.setdefault(key, (name, info.dtype, tuple(info.shape)))
        if (seen[1], seen[2]) != (info.dtype, tuple(info.shape)):
            raise CheckpointError(f"{name} is stored as {info.dtype} {list(info.shape)}, but {seen[0]} as {seen[1]} "
                                  f"{list(seen[2])}: the experts of layer {role.layer} disagree.",
                                  hint="The checkpoint is damaged; it would not load.")
    missing = sorted(expert_layers - router_layers)
    if missing:
        raise CheckpointError(f"MoE layer(s) {missing} hold experts but no router tensor with one row per expert "
                              "(a damaged header, or a router stored in another shape).",
                              hint="The checkpoint is damaged; it would not load.")


def check_experts_present(E: int, roles: dict) -> None:
    """Every MoE layer with per-expert tensors holds exactly the config's experts ``0..E-1`` (fused
    tensors are checked against ``E`` by :func:`~moeharden.model.disk.classify_tensor` itself).

    Args:
        E: the config's routed-expert count.
        roles: ``{tensor name: TensorRole or None}`` from :func:`moeharden.model.disk.classify_tensors`.
    Raises:
        CheckpointError: a layer whose experts (or router rows) disagree with ``E``.
    """
    per_layer: dict[int, set[int]] = {}
    for role in roles.values():
        if role is None:
            continue
        if role.kind == "expert":
            if role.expert is not None:
                per_layer.setdefault(role.layer, set()).add(role.expert)
    for layer, ids in sorted(per_layer.items()):
        if len(ids) != E or ids != set(range(E)):        # the count first: E comes from the config (maybe 10**12)
            raise CheckpointError(f"Layer {layer} holds experts {sorted(ids)[:12]}, but the config declares {E} "
                                  f"experts per layer (0..{E - 1}).",
                                  hint="The config and the weights disagree; the checkpoint would not load.")
