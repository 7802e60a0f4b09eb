"""Physical pruning: the attacker's artifact, a smaller checkpoint that loads anywhere.

Tensors are streamed shard by shard (one input shard open at a time) into size-capped output
shards: per-expert tensors of removed experts are dropped and the kept ones renumbered 0..K-1;
fused expert tensors, router rows, router bias and selection bias are sliced along their expert
axis; everything else is copied. The config gets the new expert count (top-k capped at K, expert
groups kept consistent), other files (tokenizer, task file, ...) are copied, and
``moeharden-prune.json`` (:class:`~moeharden.attack.records.PruneRecord`) records the source
digest and the kept original expert ids. The whole model is never loaded for this. What
``moeharden prune`` runs (keep-set choice, prune, optional re-alignment) is
:func:`moeharden.attack.steal.prune_command`.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from moeharden import __version__
from moeharden.attack.records import PRUNE_RECORD, PruneRecord
from moeharden.io.records import SourceRef

if TYPE_CHECKING:
    from moeharden.model.adapter_check import AdapterCheck


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
                     source_label: str | None = None, overwrite: bool = True,
                     trust_remote_code: bool = False, self_check: bool | AdapterCheck = True) -> PruneResult:
    """Write ``src`` pruned to ``keep`` into ``out`` (atomically), streaming shard by shard.

    Args:
        src: local checkpoint directory (safetensors, validated by the caller or here via headers).
        out: output directory; replaced only under :func:`moeharden.io.outputs.check_output_dir`'s rules.
        keep: ``{decoder layer: kept original expert ids}``, validated against the checkpoint; kept
            experts are renumbered 0..K-1 in ascending order of their original ids.
        max_shard_size: cap of each output shard (``"2GB"``, ``"40MB"`` or bytes).
        source_label: how the source is named in the result and record (e.g. the Hub id).
        overwrite: whether an earlier moeharden output at ``out`` may be replaced.
        self_check: verify the family adapter on a tiny random model (a failure refuses ``src``):
            ``True`` runs :class:`~moeharden.model.adapter_check.AdapterCheck` beside the write, or
            pass one already started; it must pass before the output is published.
    Returns:
        :class:`PruneResult`.
    Raises:
        KeepSetError: invalid keep-set (wrong layers, counts, ids, group imbalance).
        CheckpointError, UnsupportedModelError, InputError (``out`` not replaceable, bad size).
    """
    from moeharden.io.outputs import atomic_output_dir, check_output_dir
    from moeharden.io.records import tool_info
    from moeharden.io.shards import contiguous_rows, parse_size, write_streaming_shards
    from moeharden.io.sidefiles import copy_side_files
    from moeharden.model.adapter_check import AdapterCheck
    from moeharden.model.checkpoint import checkpoint_digest
    from moeharden.model.disk import pruned_config
    from moeharden.model.keepset import check_keep_counts, parse_keep, to_json
    from moeharden.model.registry import config_value

    t0 = time.perf_counter()
    src = Path(src)
    check_output_dir(out, overwrite=overwrite, kind="prune", inputs=[src])
    cap = parse_size(max_shard_size)
    from moeharden.model.checkpoint import checkpoint_layout

    cfg, spec, E, files, roles, layers = checkpoint_layout(src)
    check = self_check if isinstance(self_check, AdapterCheck) else AdapterCheck(cfg, enabled=self_check)
    with check:                                  # beside the work below (model/adapter_check.py)
        keep = parse_keep({str(k): v for k, v in keep.items()}, moe_layers=layers, num_experts=E)
        check_keep_counts(spec, cfg, keep)
        K = len(next(iter(keep.values())))
        cfg_dict = json.loads((src / "config.json").read_text())
        new_cfg = pruned_config(spec, cfg_dict, K)
        new_cfg["moeharden"] = {**(cfg_dict.get("moeharden") or {}),
                                "pruned": {"version": __version__, "kept_experts": K, "from_experts": E}}
        digest = checkpoint_digest(src)
        plan, sources = _plan(files, roles, keep)
        t1 = time.perf_counter()
        with atomic_output_dir(out, overwrite=overwrite, kind="prune", inputs=[src]) as tmp, _ShardReader() as reader:
            def produce(p):
                info, role = sources[p.name]
                if role is None or role.expert is not None:       # copied as is, file to file
                    return [(reader.handle_for(info), info.start, info.end - info.start)]
                ids, n = keep[role.layer], info.shape[role.axis]
                if contiguous_rows(info, role.axis):              # each kept expert is one contiguous byte range
                    row = (info.end - info.start) // n
                    per = row * role.rows_per_expert
                    return ([(reader.handle_for(info), info.start + e * per, per) for e in ids]
                            + [(reader.handle_for(info), info.start + r * row, row) for r in range(n - role.null, n)])
                rows = torch.tensor(role.kept_rows(ids, n), dtype=torch.long)   # general case: read, select, write
                return reader.read(info).index_select(role.axis, rows)

            shards = write_streaming_shards(tmp, plan, produce, cap,
                                            {"moeharden_version": __version__, "moeharden_pruned_from": digest})
            (tmp / "config.json").write_text(json.dumps(new_cfg, indent=2, sort_keys=True) + "\n")
            copy_side_files(src, tmp, trust_remote_code=trust_remote_code)
            record = PruneRecord(tool=tool_info(), source=SourceRef(path=source_label or str(src),
                                                                     safetensors_digest=digest),
                                 num_experts_before=E, num_experts_after=K, keep=to_json(keep)["keep"])
            (tmp / PRUNE_RECORD).write_text(record.to_file_text())
            check.wait()        # before the output is published: a failure discards it
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
                shape[role.axis] = len(role.kept_rows(ids, shape[role.axis]))
        else:
            role = None
        plan.append(PlannedTensor(name, info.dtype, tuple(shape), dtype_nbytes(info.dtype, shape)))
        sources[name] = (info, role)
    return plan, sources
