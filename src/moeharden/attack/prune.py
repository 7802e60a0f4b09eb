"""Physical pruning: the attacker's artifact, a smaller checkpoint that loads anywhere.

Tensors are streamed shard by shard (one input shard open at a time) into size-capped output
shards: per-expert tensors of removed experts are dropped and the kept ones renumbered 0..K-1;
fused expert tensors, router rows, router bias and selection bias are sliced along their expert
axis; everything else is copied. The config gets the new expert count (top-k capped at K, expert
groups kept consistent), other files (tokenizer, task file, ...) are copied, and
``moeharden-prune.json`` records the source digest and the kept original expert ids. The whole
model is never loaded for this.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from moeharden import __version__
from moeharden.errors import UsageError

PRUNE_RECORD = "moeharden-prune.json"
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".pkl", ".h5", ".msgpack", ".gguf")
_SKIP_FILES = {"config.json", "model.safetensors.index.json", "moeharden-manifest.json", "model.sig", PRUNE_RECORD}


@dataclass(frozen=True)
class PruneResult:
    """What was written: source, destination, expert counts, layers, shards and timings."""

    source: str
    out: str
    num_experts_before: int
    num_experts_after: int
    top_k_after: int | None
    layers: list[int]
    shards: list[str]
    keep: dict[str, list[int]] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)   # seconds: check, write, total

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def prune_checkpoint(src: Path, out: Path, keep: dict[int, list[int]], *, max_shard_size: str | int = "2GB",
                     source_label: str | None = None, overwrite: bool = True) -> PruneResult:
    """Write ``src`` pruned to ``keep`` into ``out`` (atomically), streaming shard by shard.

    Args:
        src: local checkpoint directory (safetensors, validated by the caller or here via headers).
        out: output directory; replaced only under :func:`moeharden.io.shards.check_output_dir`'s rules.
        keep: ``{decoder layer: kept original expert ids}``, validated against the checkpoint; kept
            experts are renumbered 0..K-1 in ascending order of their original ids.
        max_shard_size: cap of each output shard (``"2GB"``, ``"40MB"`` or bytes).
        source_label: how the source is named in the result and record (e.g. the Hub id).
        overwrite: whether an earlier moeharden output at ``out`` may be replaced.
    Returns:
        :class:`PruneResult`.
    Raises:
        KeepSetError: invalid keep-set (wrong layers, counts, ids, group imbalance).
        CheckpointError, UnsupportedModelError, InputError (``out`` not replaceable, bad size).
    """
    from moeharden.io.shards import atomic_output_dir, check_output_dir, parse_size, write_streaming_shards
    from moeharden.model.checkpoint import checkpoint_digest
    from moeharden.model.keepset import parse_keep, to_json
    from moeharden.model.registry import check_keep_counts, config_value, pruned_config

    t0 = time.perf_counter()
    src = Path(src)
    check_output_dir(out, overwrite=overwrite)
    cap = parse_size(max_shard_size)
    from moeharden.model.checkpoint import checkpoint_layout

    cfg, spec, E, files, roles, layers = checkpoint_layout(src)
    keep = parse_keep({str(k): v for k, v in keep.items()}, moe_layers=layers, num_experts=E)
    check_keep_counts(spec, cfg, keep)
    K = len(next(iter(keep.values())))
    cfg_dict = json.loads((src / "config.json").read_text())
    new_cfg = pruned_config(spec, cfg_dict, K)
    new_cfg["moeharden"] = {**(cfg_dict.get("moeharden") or {}),
                            "pruned": {"version": __version__, "kept_experts": K, "from_experts": E}}
    digest = checkpoint_digest(src)
    index = {layer: torch.tensor(ids, dtype=torch.long) for layer, ids in keep.items()}
    plan, sources = _plan(files, roles, keep)
    t1 = time.perf_counter()
    with atomic_output_dir(out, overwrite=overwrite) as tmp, _ShardReader() as reader:
        def produce(p):
            info, role = sources[p.name]
            if role is None or role.expert is not None:       # copied as is, file to file
                return [(reader.handle_for(info), info.start, info.end - info.start)]
            ids = keep[role.layer]
            if all(d == 1 for d in info.shape[:role.axis]):   # each kept expert is one contiguous byte range
                per = (info.end - info.start) // (info.shape[role.axis] // role.rows_per_expert)
                return [(reader.handle_for(info), info.start + e * per, per) for e in ids]
            rows = index[role.layer]                          # general case: read, select, write
            if role.rows_per_expert > 1:
                r = role.rows_per_expert
                rows = (rows[:, None] * r + torch.arange(r)[None, :]).reshape(-1)
            return reader.read(info).index_select(role.axis, rows)

        shards = write_streaming_shards(tmp, plan, produce, cap,
                                        {"moeharden_version": __version__, "moeharden_pruned_from": digest})
        (tmp / "config.json").write_text(json.dumps(new_cfg, indent=2, sort_keys=True) + "\n")
        for item in src.iterdir():
            if item.name in _SKIP_FILES or item.name.startswith(".") or item.suffix in _WEIGHT_SUFFIXES:
                continue
            if item.is_dir():
                shutil.copytree(item, tmp / item.name)
            else:
                shutil.copy2(item, tmp / item.name)
        (tmp / PRUNE_RECORD).write_text(json.dumps({
            "schema": "moeharden.prune/1", "tool": {"name": "moeharden", "version": __version__},
            "source": {"path": source_label or str(src), "safetensors_digest": digest},
            "num_experts_before": E, "num_experts_after": K, **to_json(keep)}, indent=2) + "\n")
    t2 = time.perf_counter()
    top_k = config_value(new_cfg, spec.top_k_keys)
    return PruneResult(str(source_label or src), str(out), E, K, None if top_k is None else int(top_k), sorted(keep),
                       [s.name for s in shards], {str(k): v for k, v in sorted(keep.items())},
                       {"check": round(t1 - t0, 3), "write": round(t2 - t1, 3), "total": round(t2 - t0, 3)})


class _ShardReader:
    """Reads tensors with one input shard file open at a time (reopened when the shard changes)."""

    def __enter__(self):
        self.path, self.handle = None, None
        return self

    def handle_for(self, info):
        if info.file != self.path:
            if self.handle is not None:
                self.handle.close()
            self.path, self.handle = info.file, open(info.file, "rb")
        return self.handle

    def read(self, info):
        from moeharden.io.shards import read_tensor

        return read_tensor(info, self.handle_for(info))

    def __exit__(self, *exc):
        if self.handle is not None:
            self.handle.close()
        return False


def _plan(files, roles, keep):
    """Output tensors in input order (shard by shard, by file offset), with where each comes from."""
    from moeharden.io.shards import PlannedTensor, dtype_nbytes

    plan, sources = [], {}
    ordered = sorted(files.tensors.values(), key=lambda i: (files.shards.index(i.file), i.start))
    for info in ordered:
        role = roles[info.name]
        name, shape = info.name, list(info.shape)
        if role is not None and role.layer in keep:
            ids = keep[role.layer]
            if role.expert is not None:
                if role.expert not in ids:
                    continue                      # a removed expert's tensor: dropped
                name = role.rename(info.name, ids.index(role.expert))
            else:
                shape[role.axis] = len(ids) * role.rows_per_expert
        else:
            role = None
        plan.append(PlannedTensor(name, info.dtype, tuple(shape), dtype_nbytes(info.dtype, shape)))
        sources[name] = (info, role)
    return plan, sources


def _attack_tasks(src: Path, task: str, limit: int | None):
    """``(target task, other tasks)``: ``task`` names a task of the checkpoint's own task file, or is
    any ``--task`` spec (preset, file, ``file#name``); the others are the contrastive reference."""
    from moeharden.tasks.loading import TASK_FILE_NAME, load_tasks, read_task_file

    own = Path(src) / TASK_FILE_NAME
    if own.is_file() and task in {t.name for t in read_task_file(own).tasks}:
        tasks = load_tasks(None, checkpoint_dir=src, limit=limit, seed=None)
        target = next(t for t in tasks if t.name == task)
        return target, [t for t in tasks if t.name != task]
    tasks = load_tasks([task], checkpoint_dir=src, limit=limit, seed=None)
    return tasks[0], tasks[1:]


def attributed_keep(src: Path, *, method: str, task: str, keep: int, limit: int | None = None,
                    batch_size: int = 32, trust_remote_code: bool = False) -> dict[int, list[int]]:
    """The attacker's keep-set: score experts with ``method`` on ``task``, keep the top ``keep`` per layer.

    Only the attribution pass runs (no pruning sweep). With group-limited routing the top experts
    are taken inside each group, ``keep / groups`` per group.

    Args:
        src: local checkpoint directory.
        method: one of :data:`moeharden.attack.attribution.ALL_METHODS`.
        task: a task of the checkpoint's own ``moeharden-tasks.yaml``, or a ``--task`` spec.
        keep: experts kept per MoE layer.
    Returns:
        ``{decoder layer: kept original expert ids}``.
    Raises:
        UsageError: unknown method. KeepSetError: ``keep`` not prunable on this model.
        TaskError, CheckpointError, UnsupportedModelError.
    """
    from moeharden.attack.attribution import (
        ALL_METHODS,
        ablation_scores,
        contrastive_scores,
        keep_sets,
        observed_scores,
        routing_stats,
    )
    from moeharden.errors import KeepSetError
    from moeharden.model.checkpoint import load_model, load_tokenizer
    from moeharden.model.registry import moe_layers, routing_groups, valid_keep
    from moeharden.model.routing import mask_experts
    from moeharden.tasks.metrics import task_loss

    if method not in ALL_METHODS:
        raise UsageError(f"Unknown method {method!r}.", hint=f"Choose from: {', '.join(ALL_METHODS)}.")
    target, others = _attack_tasks(src, task, limit)
    model = load_model(src, trust_remote_code=trust_remote_code)
    tok = load_tokenizer(src)
    info = moe_layers(model)
    layers, E, spec = [li.layer for li in info], info[0].num_experts, info[0].spec
    groups = routing_groups(spec, model.config)
    if not valid_keep(spec, model.config, keep):
        raise KeepSetError(f"--keep {keep} cannot be pruned to on this {spec.name} model ({E} experts per layer"
                           + (f", {groups} routing groups" if groups > 1 else "") + ").",
                           hint=f"Use a count from {spec.min_keep} to {E}" + (f", a multiple of {groups}." if groups > 1
                                                                                 else "."))
    if method == "ablation":
        @torch.no_grad()
        def loss_with_mask(mask):
            if mask is None:
                return float(task_loss(model, tok, target.attribution))
            with mask_experts(model, mask):
                return float(task_loss(model, tok, target.attribution))

        scores = ablation_scores(layers, E, loss_with_mask, skip_invalid=True)
    else:
        stats = routing_stats(model, tok, target.calibration_texts(), layers, E, batch_size)
        if method == "contrastive":
            scores = contrastive_scores(stats, [routing_stats(model, tok, o.calibration_texts(), layers, E, batch_size)
                                                for o in others])
        else:
            scores = observed_scores(stats)[method]
    return keep_sets(scores, layers, keep, groups=groups)


def prune_command(*, ckpt: str, out: Path, experts_from: Path | None, method: str | None, task: str | None,
                  keep: int | None, max_shard_size: str, trust_remote_code: bool = False,
                  recover: bool = False, recover_mode: str = "full", recover_strategy: str = "entropy",
                  recover_budget: int = 64, recover_seed: int = 0) -> PruneResult:
    """What ``moeharden prune`` runs: a keep-set from KEEP.json, or from an attribution method;
    with ``recover``, the pruned checkpoint is then re-aligned on ``task`` (the attacker's
    re-alignment attack, :mod:`moeharden.attack.realign`) and written in its place.

    Raises:
        UsageError: neither or both ways of choosing experts; KeepSetError; CheckpointError.
    """
    from moeharden.io.shards import check_output_dir, parse_size
    from moeharden.model.checkpoint import resolve_checkpoint
    from moeharden.model.keepset import read_keep_file

    by_method = method is not None or keep is not None
    if experts_from is not None and by_method:
        raise UsageError("Give either --experts-from KEEP.json or --method/--task/--keep, not both.")
    if experts_from is None and not by_method:
        raise UsageError("Say which experts to keep: --experts-from KEEP.json, or --method M --task T --keep K.")
    if by_method and (method is None or task is None or keep is None):
        raise UsageError("--method, --task and --keep go together.")
    if recover and task is None:
        raise UsageError("--recover needs --task: the task whose labels the re-alignment attack buys.")
    check_output_dir(out)               # fail before any expensive work
    parse_size(max_shard_size)
    src = resolve_checkpoint(ckpt, trust_remote_code=trust_remote_code)
    if experts_from is not None:
        from moeharden.model.checkpoint import checkpoint_layout

        _, _, E, _, _, layers = checkpoint_layout(src)
        chosen = read_keep_file(experts_from, moe_layers=layers, num_experts=E)
    else:
        chosen = attributed_keep(src, method=method, task=task, keep=keep, trust_remote_code=trust_remote_code)
    result = prune_checkpoint(src, out, chosen, max_shard_size=max_shard_size, source_label=str(ckpt))
    if recover:
        recover_pruned(Path(out), task=task, mode=recover_mode, strategy=recover_strategy, budget=recover_budget,
                       seed=recover_seed, max_shard_size=max_shard_size)
    return result


def recover_pruned(path: Path, *, task: str, mode: str, strategy: str, budget: int, seed: int,
                   max_shard_size: str = "2GB") -> dict:
    """Re-align a physically pruned checkpoint in place (atomically) and record how in its prune record.

    Raises:
        TaskError, UsageError (unknown mode/strategy).
    """
    from moeharden.attack.realign import RecoverySettings, run_recovery, task_ops
    from moeharden.io.shards import atomic_output_dir
    from moeharden.model.checkpoint import load_model, load_tokenizer
    from moeharden.model.registry import moe_layers

    try:
        settings = RecoverySettings(mode=mode, strategy=strategy, budget=budget, seed=seed)
    except ValueError as err:
        raise UsageError(str(err)) from None
    t, _ = _attack_tasks(path, task, None)
    model, tok = load_model(path), load_tokenizer(path)
    info = moe_layers(model)
    params = [li.router_weight for li in info] + [li.router_bias for li in info if li.router_bias is not None]
    from moeharden.attack.realign import _lora_targets

    run = run_recovery(model, task_ops(tok, t), t.train, settings, router_params=params,
                       lora_targets=_lora_targets(info), keep_trained=True)
    record = json.loads((path / PRUNE_RECORD).read_text())
    record["recovery"] = {"task": t.name, "mode": mode, "strategy": strategy, "budget": budget, "seed": seed,
                          "labels_used": run.labels_used, "curve": run.points}
    with atomic_output_dir(path) as tmp:
        model.save_pretrained(tmp, safe_serialization=True, max_shard_size=max_shard_size)
        tok.save_pretrained(tmp)
        for item in path.iterdir():
            if item.suffix == ".safetensors" or item.name in ("model.safetensors.index.json", "config.json") or \
                    item.name.startswith(".") or (tmp / item.name).exists():
                continue
            (shutil.copytree if item.is_dir() else shutil.copy2)(item, tmp / item.name)
        (tmp / PRUNE_RECORD).write_text(json.dumps(record, indent=2) + "\n")
    return record["recovery"]
