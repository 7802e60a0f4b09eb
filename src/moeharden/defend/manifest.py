"""The release manifest: a sha256 of every tensor, and a fingerprint of every expert.

* Tensor hashes are computed from each tensor's bytes, read straight from the safetensors files
  (header offsets, a bounded buffer, one shard open at a time), so ``verify`` can *name* a
  changed tensor, not only say that a file changed.
* Expert fingerprints survive fine-tuning and pruning: each expert weight matrix ``W [a, b]``
  becomes ``P_a · W · r_b`` — a fixed random Gaussian projection (seeded by shape) of ``W``'s
  response to a fixed random input — 32 numbers per matrix, concatenated per expert. A fine-tune
  moves ``W`` a little and the sketch a little (cosine ≈ 1); another expert's sketch is nearly
  orthogonal (cosine ≈ 0), so a suspect's experts can be matched to the originals they came from.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from moeharden.errors import CheckpointError

SKETCH_DIM = 32
_SEED = 20251119


def tensor_sha256(files) -> Iterator[tuple[str, str]]:
    """``(name, sha256 hex of the tensor's bytes)`` for every tensor, one shard file open at a time.

    Args:
        files: a :class:`moeharden.io.shards.CheckpointFiles`.
    Returns:
        An iterator over the tensors, shard by shard in file order.
    Raises:
        CheckpointError: a shard ends inside a tensor (truncated or changed since it was indexed).
    """
    buf = bytearray(8 << 20)
    view = memoryview(buf)
    by_file: dict[Path, list] = {}
    for info in files.tensors.values():
        by_file.setdefault(info.file, []).append(info)
    for shard in files.shards:
        with open(shard, "rb", buffering=0) as f:
            for info in sorted(by_file.get(shard, []), key=lambda i: i.start):
                h = hashlib.sha256()
                f.seek(info.start)
                left = info.end - info.start
                while left:
                    n = f.readinto(view[:min(left, len(buf))])
                    if not n:
                        raise CheckpointError(f"{shard.name} ends inside tensor {info.name}: it was truncated "
                                              "or changed while being hashed.")
                    h.update(view[:n])
                    left -= n
                yield info.name, h.hexdigest()


def _gauss(shape: tuple[int, ...], tag: str) -> torch.Tensor:
    g = torch.Generator().manual_seed(_SEED + int(hashlib.sha256(f"{tag}{shape}".encode()).hexdigest()[:8], 16))
    return torch.randn(shape, generator=g, dtype=torch.float32)


def sketch_matrix(w: torch.Tensor) -> torch.Tensor:
    """``P_a · W · r_b`` for a 2-D expert matrix (orientation-normalised: the longer side is ``a``)."""
    w = w.detach().float()
    if w.dim() == 1:
        w = w[:, None]
    if w.shape[0] < w.shape[1]:
        w = w.T
    a, b = w.shape
    resp = w @ _gauss((b,), "in")                          # [a] response to a fixed random input
    return _gauss((SKETCH_DIM, a), "out") @ resp / (a ** 0.5)   # [SKETCH_DIM]


def expert_matrices(files, roles) -> dict[int, dict[int, list[tuple[str, Any]]]]:
    """Where each expert's weights are: ``{layer: {expert: [(key, (info, role, index)), ...]}}``.

    ``key`` identifies the matrix within the expert (a per-expert tensor's name suffix, or a fused
    tensor's name), so the same matrix of two checkpoints of one family is compared.
    """
    out: dict[int, dict[int, list]] = {}
    for name, role in roles.items():
        if role is None or role.kind != "expert":
            continue
        info = files.tensors[name]
        if role.expert is not None:
            key = name.split(f".experts.{role.expert}.", 1)[-1]
            out.setdefault(role.layer, {}).setdefault(role.expert, []).append((key, (info, role, None)))
        else:
            per = role.rows_per_expert
            n = info.shape[role.axis] // per                   # experts fused along role.axis
            key = name.rsplit(".", 1)[-1] if ".experts." not in name else name.split(".experts.", 1)[-1]
            for e in range(n):
                out.setdefault(role.layer, {}).setdefault(e, []).append((key, (info, role, e)))
    return out


def fingerprints(files, spec, config, roles) -> dict[str, dict[str, list[float]]]:
    """``{layer: {expert: sketch}}`` for every routed expert (one fused tensor read at a time)."""
    from moeharden.io.shards import contiguous_rows, read_rows, read_tensor

    where = expert_matrices(files, roles)
    cache: dict[str, torch.Tensor] = {}
    out: dict[str, dict[str, list[float]]] = {}
    for layer in sorted(where):
        for e in sorted(where[layer]):
            parts = []
            for _key, (info, role, idx) in sorted(where[layer][e], key=lambda x: x[0]):
                r = role.rows_per_expert if idx is not None else 1
                if idx is None:
                    w = read_tensor(info)
                elif contiguous_rows(info, role.axis):         # one expert's bytes: read them alone
                    w = read_rows(info, role.axis, idx * r, r)
                    w = w if r > 1 else w.select(role.axis, 0)
                else:
                    if info.name not in cache:
                        cache.clear()                      # one fused tensor resident at a time
                        cache[info.name] = read_tensor(info)
                    t = cache[info.name]
                    w = t.narrow(role.axis, idx * r, r) if r > 1 else t.select(role.axis, idx)
                parts.append(sketch_matrix(w))
            v = torch.cat(parts)
            if not bool(torch.isfinite(v).all()):      # NaN/inf weights: no fingerprint (JSON has no NaN)
                from moeharden.errors import CheckpointError

                names = ", ".join(sorted({info.name for _k, (info, _r, _i) in where[layer][e]}))
                raise CheckpointError(f"Expert {e} of layer {layer} holds non-finite weights (NaN or inf) in {names}.",
                                      hint="The checkpoint is damaged; a release must not carry it.")
            out.setdefault(str(layer), {})[str(e)] = [round(float(x), 6) for x in v / v.norm().clamp(min=1e-12)]
    return out


def match_experts(original: dict[str, dict[str, list[float]]], suspect: dict[str, dict[str, list[float]]],
                  min_cosine: float = 0.5) -> dict[str, dict[str, Any]]:
    """Match each suspect expert to the original expert it came from, per layer.

    Returns:
        ``{layer: {"kept": [original ids], "removed": [...], "mapping": {suspect id: original id},
        "cosine": {suspect id: similarity}}}``; a suspect expert whose best cosine is below
        ``min_cosine`` maps to ``None`` (not derived from any original expert).
    """
    out: dict[str, dict[str, Any]] = {}
    for layer, sus in suspect.items():
        orig = original.get(layer)
        if not orig:
            continue
        o_ids = sorted(orig, key=int)
        orig_m = torch.tensor([orig[i] for i in o_ids])                  # [E, d]
        mapping, cos, taken = {}, {}, set()
        s_ids = sorted(sus, key=int)
        S = torch.tensor([sus[i] for i in s_ids])                        # [K, d]
        sim = S @ orig_m.T                                               # [K, E] cosines (unit vectors)
        pairs = sorted(((float(sim[a, b]), a, b) for a in range(len(s_ids)) for b in range(len(o_ids))),
                       reverse=True)
        for c, a, b in pairs:                                            # greedy one-to-one matching
            if s_ids[a] in mapping or b in taken or c < min_cosine:
                continue
            mapping[s_ids[a]], cos[s_ids[a]] = int(o_ids[b]), round(c, 4)
            taken.add(b)
        for a in range(len(s_ids)):
            if s_ids[a] not in mapping:
                mapping[s_ids[a]], cos[s_ids[a]] = None, round(float(sim[a].max()), 4)
        kept = sorted(v for v in mapping.values() if v is not None)
        out[layer] = {"kept": kept, "removed": sorted(int(i) for i in o_ids if int(i) not in kept),
                      "mapping": mapping, "cosine": cos}
    return out


def disk_groups(path: Path, files, spec, config, roles) -> dict[str, str]:
    """Policy group of every on-disk tensor, resolved through the registry.

    Expert/router tensors come from :func:`moeharden.model.disk.classify_tensors`; the rest from the
    registry's :func:`~moeharden.model.registry.parameter_groups` on a meta-device instance of the model
    (no weights are loaded), matched by name.
    """
    from transformers import AutoModelForCausalLM

    from moeharden.model.registry import parameter_groups

    with torch.device("meta"):
        meta = AutoModelForCausalLM.from_config(config)
    by_name = {n: g for g, names in parameter_groups(None, meta).items() for n in names}
    out = {}
    for name in files.tensors:
        role = roles.get(name)
        if role is not None:
            out[name] = "experts" if role.kind == "expert" else "router"
        else:
            out[name] = by_name.get(name, "other")
    return out
