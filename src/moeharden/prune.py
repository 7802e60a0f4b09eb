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
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def checkpoint_layout(src: Path):
    """(config object, family spec, expert count, file index, {tensor: role}, MoE layers) of a checkpoint."""
    from moeharden.checkpoint import load_config
    from moeharden.registry import classify_tensor, num_experts, spec_for_config
    from moeharden.st_io import CheckpointFiles

    cfg = load_config(src)
    spec = spec_for_config(cfg)
    E = num_experts(cfg)
    files = CheckpointFiles(src)
    roles = {name: classify_tensor(spec, cfg, name, info.shape) for name, info in files.tensors.items()}
    layers = sorted({r.layer for r in roles.values() if r is not None and r.kind == "expert"})
    return cfg, spec, E, files, roles, layers


def prune_checkpoint(src: Path, out: Path, keep: dict[int, list[int]], *, max_shard_size: str | int = "2GB",
                     source_label: str | None = None) -> PruneResult:
    """Write ``src`` pruned to ``keep`` into ``out`` (atomically), streaming shard by shard.

    Args:
        keep: ``{decoder layer: kept original expert ids}``, validated against the checkpoint.
    Raises:
        KeepSetError: invalid keep-set (wrong layers, counts, ids, group imbalance).
        CheckpointError, UnsupportedModelError.
    """
    from moeharden.checkpoint import checkpoint_digest
    from moeharden.keepset import parse_keep, to_json
    from moeharden.registry import check_keep_counts, config_value, pruned_config
    from moeharden.st_io import atomic_output_dir, parse_size, write_streaming_shards

    t0 = time.perf_counter()
    src = Path(src)
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
    with atomic_output_dir(out) as tmp, _ShardReader() as reader:
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

        shards = write_streaming_shards(tmp, plan, produce, parse_size(max_shard_size),
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
    top_k = config_value(new_cfg, spec.top_k_keys)
    return PruneResult(str(source_label or src), str(out), E, K, None if top_k is None else int(top_k), sorted(keep),
                       [s.name for s in shards], {str(k): v for k, v in sorted(keep.items())},
                       round(time.perf_counter() - t0, 3))


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
        from moeharden.st_io import read_tensor

        return read_tensor(info, self.handle_for(info))

    def __exit__(self, *exc):
        if self.handle is not None:
            self.handle.close()
        return False


def _plan(files, roles, keep):
    """Output tensors in input order (shard by shard, by file offset), with where each comes from."""
    from moeharden.st_io import PlannedTensor

    plan, sources = [], {}
    width = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
             "F8_E4M3": 1, "F8_E5M2": 1}
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
        n = 1
        for d in shape:
            n *= d
        plan.append(PlannedTensor(name, info.dtype, tuple(shape), n * width[info.dtype]))
        sources[name] = (info, role)
    return plan, sources


def attributed_keep(src: Path, *, method: str, task: str, keep: int, limit: int | None = None,
                    trust_remote_code: bool = False) -> dict[int, list[int]]:
    """The attacker's keep-set: run attribution ``method`` on ``task`` and keep the top ``keep`` per layer."""
    from moeharden.attribution import ALL_METHODS, keep_sets
    from moeharden.checkpoint import load_model, load_tokenizer
    from moeharden.registry import moe_layers
    from moeharden.scan import ScanSettings, model_identity, scan_model
    from moeharden.tasks import load_tasks

    if method not in ALL_METHODS:
        raise UsageError(f"Unknown method {method!r}.", hint=f"Choose from: {', '.join(ALL_METHODS)}.")
    tasks = load_tasks([task] if task != "own" else None, checkpoint_dir=src, limit=limit, seed=None)
    model = load_model(src, trust_remote_code=trust_remote_code)
    tok = load_tokenizer(src)
    info = moe_layers(model)
    if not 1 <= keep <= info[0].num_experts:
        from moeharden.errors import KeepSetError

        raise KeepSetError(f"--keep {keep} is outside 1..{info[0].num_experts}.")
    methods = (method, "contrastive") if method == "contrastive" else (method,)
    data = scan_model(model, tok, tasks, ScanSettings(methods=methods, keeps=(keep,), random_seeds=1),
                      identity=model_identity(src, model, info))
    name = tasks[0].name
    scores = torch.tensor(data["attribution"][method][name], dtype=torch.float64)
    return keep_sets(scores, [li.layer for li in info], keep)


def prune_command(*, ckpt: str, out: Path, experts_from: Path | None, method: str | None, task: str | None,
                  keep: int | None, max_shard_size: str, trust_remote_code: bool = False) -> PruneResult:
    """What ``moeharden prune`` runs: a keep-set from KEEP.json, or from an attribution method.

    Raises:
        UsageError: neither or both ways of choosing experts; KeepSetError; CheckpointError.
    """
    from moeharden.checkpoint import resolve_checkpoint
    from moeharden.keepset import read_keep_file

    by_method = method is not None or task is not None or keep is not None
    if experts_from is not None and by_method:
        raise UsageError("Give either --experts-from KEEP.json or --method/--task/--keep, not both.")
    if experts_from is None and not by_method:
        raise UsageError("Say which experts to keep: --experts-from KEEP.json, or --method M --task T --keep K.")
    if by_method and (method is None or task is None or keep is None):
        raise UsageError("--method, --task and --keep go together.")
    src = resolve_checkpoint(ckpt)
    if experts_from is not None:
        _, _, E, _, _, layers = checkpoint_layout(src)
        chosen = read_keep_file(experts_from, moe_layers=layers, num_experts=E)
    else:
        chosen = attributed_keep(src, method=method, task=task, keep=keep, trust_remote_code=trust_remote_code)
    return prune_checkpoint(src, out, chosen, max_shard_size=max_shard_size, source_label=str(ckpt))
