"""Disk view of the registry: which safetensors tensors of a checkpoint are indexed by expert.

transformers 5 ``save_pretrained`` writes many families in their original per-expert layout
(Mixtral: ``block_sparse_moe.experts.3.w1.weight``), others fused (gpt-oss:
``mlp.experts.gate_up_proj`` ``[E, H, 2I]``), DBRX flattened (``ffn.experts.mlp.w1`` ``[E·I, H]``).
:func:`classify_tensor` names the expert axis of each tensor so that physical pruning can slice
it without loading the model, and :func:`pruned_config` writes the config of the result. The
family facts themselves (config keys, flattened rows) come from :mod:`moeharden.model.registry`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from moeharden.errors import KeepSetError, UnsupportedModelError
from moeharden.model.registry import FamilySpec, config_value, get_path, null_experts, routing_groups


@dataclass(frozen=True)
class TensorRole:
    """How a checkpoint tensor is indexed by expert.

    ``kind``: ``expert`` (per-expert tensor when ``expert`` is set, else fused along ``axis``),
    ``router`` (rows along ``axis``) or ``selection_bias`` (along ``axis``). Flattened layouts
    (DBRX ``[E·I, H]``) have ``rows_per_expert = I``. ``null``: rows after the ``E`` experts' of a
    router or selection bias that belong to weightless null experts (always kept, in order).
    """

    layer: int
    kind: Literal["expert", "router", "selection_bias"]
    expert: int | None = None
    axis: int | None = None
    rows_per_expert: int = 1
    null: int = 0

    def kept_rows(self, ids: Sequence[int], size: int) -> list[int]:
        """Indices along ``axis`` (of length ``size``) that keeping experts ``ids`` keeps, in order."""
        r = self.rows_per_expert
        rows = [e * r + j for e in ids for j in range(r)]
        return rows + list(range(size - self.null, size)) if self.null else rows

    def rename(self, name: str, new_expert: int) -> str:
        """The name of a per-expert tensor renumbered to ``new_expert``."""
        return _PER_EXPERT.sub(lambda m: f"{m.group(1)}{new_expert}{m.group(3)}", name, count=1)


_LAYER = re.compile(r"\.(?:layers|blocks)\.(\d+)\.")
_PER_EXPERT = re.compile(r"(\.experts\.)(\d+)(\.)")
_SHARED = re.compile(r"shared_expert|shared_mlp")
# MoE-block names on disk (they may differ from the module names: Mixtral's `mlp` is saved as
# `block_sparse_moe`); router tensors are the block's gate/router weight/bias (DBRX/Granite: .layer.)
_BLOCK_DISK = r"(?:mlp|block_sparse_moe|feed_forward|ffn|moe|mixer)"
_ROUTER = re.compile(r"(?:\.\d+|" + _BLOCK_DISK + r")\.(?:gate|router)(?:\.layer|\.wg|\.gate|\.proj)?\.(?:weight|bias)$")
# selection-bias names on disk (HY-V3's module `e_score_correction_bias` is saved as `expert_bias`)
_SELECTION_BIAS = ("e_score_correction_bias", "expert_bias")
_FUSED_EXTRA = re.compile(_BLOCK_DISK + r"\.(?:input_linear|output_linear)\.weight$")


def classify_tensor(spec: FamilySpec, config: Any, name: str, shape: Sequence[int]) -> TensorRole | None:
    """Role of one on-disk tensor by its stored name (``None``: not indexed by expert, copied as is).

    Raises:
        UnsupportedModelError: a tensor that looks expert-indexed but whose shape disagrees with
            the config's expert count (the registry would prune it wrongly).
    """
    return _classify(spec, config, name, shape)


def classify_tensors(spec: FamilySpec, config: Any,
                     shapes: Mapping[str, Sequence[int]]) -> dict[str, TensorRole | None]:
    """``{stored name: role or None}`` of a whole checkpoint.

    Stored names are read first (:func:`classify_tensor`). Where that leaves the checkpoint without
    an expert tensor, or an MoE layer without its router, the family is saved in another layout
    than its modules (Ergo: ``layers.N.feed_forward.gate_kernel`` ``[H, E]`` for
    ``model.layers.N.mlp.gate.linear.weight``), and the names not placed are read again through
    transformers' own conversion table: its renamings, and a converter that only transposes (the
    expert axis is mapped back to the stored layout). Converters that merge or split tensors
    (per-expert tensors stored, fused in the model) are not replayed: those names are read as
    stored. The table is consulted only then (building it costs about 0.7 s).

    Raises:
        UnsupportedModelError: as :func:`classify_tensor`.
    """
    roles = {name: _classify(spec, config, name, shape) for name, shape in shapes.items()}
    if _placed(roles):
        return roles
    model_type = config_value(config, ("model_type",))
    for name, shape in shapes.items():
        if roles[name] is None:
            roles[name] = _through_conversion(spec, config, model_type, name, shape)
    return roles


def _placed(roles: Mapping[str, TensorRole | None]) -> bool:
    """Some expert tensor, and a router for every layer that has one."""
    experts = {r.layer for r in roles.values() if r is not None and r.kind == "expert"}
    routers = {r.layer for r in roles.values() if r is not None and r.kind == "router"}
    return bool(experts) and experts <= routers


def _through_conversion(spec: FamilySpec, config: Any, model_type: str | None, name: str,
                        shape: Sequence[int]) -> TensorRole | None:
    moved = _module_view(model_type, name)
    if moved is None:
        return None
    module_name, swap = moved
    shape = list(shape)
    a = b = 0
    if swap is not None and shape:
        a, b = (d % len(shape) for d in swap)
        shape[a], shape[b] = shape[b], shape[a]
    role = _classify(spec, config, module_name, shape)
    if role is None or swap is None or role.axis is None or not shape:
        return role
    axis = b if role.axis == a else a if role.axis == b else role.axis
    return TensorRole(role.layer, role.kind, role.expert, axis, role.rows_per_expert, role.null)


_VIEWS: dict[str, tuple[list, list, dict]] = {}


def _module_view(model_type: str | None, name: str) -> tuple[str, tuple[int, int] | None] | None:
    """``(module-side name, transposed dims or None)`` of a stored tensor by transformers' conversion
    table for ``model_type``; ``None`` where the table does not rename it or changes it otherwise."""
    if not model_type:
        return None
    if model_type not in _VIEWS:
        try:
            from transformers.conversion_mapping import get_checkpoint_conversion_mapping
            from transformers.core_model_loading import WeightConverter, WeightRenaming
        except ImportError:
            return None
        mapping = get_checkpoint_conversion_mapping(model_type) or []
        convs = [m for m in mapping if isinstance(m, WeightConverter)]
        _VIEWS[model_type] = ([m for m in mapping if isinstance(m, WeightRenaming)], convs,
                              {p: c for c in convs for p in c.source_patterns})
    renamings, converters, by_pattern = _VIEWS[model_type]
    if not renamings and not converters:
        return None
    from transformers.core_model_loading import Transpose, rename_source_key

    renamed, pattern = rename_source_key(name, renamings, converters)
    swap = None
    if pattern is not None:
        ops = by_pattern[pattern].operations
        if len(ops) != 1 or type(ops[0]) is not Transpose or len(by_pattern[pattern].source_patterns) != 1:
            return None
        swap = (ops[0].dim0, ops[0].dim1)
    return (renamed, swap) if renamed != name else None


def expert_slot(name: str) -> str:
    """A per-expert tensor's name with its expert id replaced by ``*`` (the same slot in every expert)."""
    return _PER_EXPERT.sub(r"\1*\3", name, count=1)


def _classify(spec: FamilySpec, config: Any, name: str, shape: Sequence[int]) -> TensorRole | None:
    m = _LAYER.search(name)
    if m is None or _SHARED.search(name):
        return None
    layer = int(m.group(1))
    E = config_value(config, spec.expert_keys, layer)
    shape = list(shape)
    pe = _PER_EXPERT.search(name)
    if pe is not None:
        if E is not None and int(pe.group(2)) >= int(E):
            raise UnsupportedModelError(f"{name}: expert id {pe.group(2)} but the config has {E} experts per layer.")
        return TensorRole(layer, "expert", expert=int(pe.group(2)))
    null = null_experts(spec, config, layer)
    if spec.selection_bias and name.endswith(_SELECTION_BIAS + (spec.selection_bias.rsplit(".", 1)[-1],)):
        null = null if spec.null_routable else 0          # shared experts' gates have no selection bias
        if null and (not shape or E is None or shape[-1] != E + null):
            raise UnsupportedModelError(f"{name}: selection bias of shape {shape}, expected {E} experts and "
                                        f"{null} null experts.")
        return TensorRole(layer, "selection_bias", axis=len(shape) - 1, null=null)
    if ".experts." in name or _FUSED_EXTRA.search(name):
        if spec.flat_rows_key:
            rows = int(config_value(config, (spec.flat_rows_key,)))
            if shape[0] != E * rows:
                raise UnsupportedModelError(f"{name}: expected {E}×{rows} rows, found shape {shape}.")
            return TensorRole(layer, "expert", axis=0, rows_per_expert=rows)
        if not shape or shape[0] != E:
            raise UnsupportedModelError(f"{name}: fused expert tensor of shape {shape}, expected {E} experts first.")
        return TensorRole(layer, "expert", axis=0)
    if (_ROUTER.search(name) or name.endswith(spec.expert_vectors)
            or spec.router_linear and name.endswith(_router_leaves(spec))):
        if not shape or E is None or shape[0] != E + null:
            return None   # e.g. a 1-row gate of a dense block
        return TensorRole(layer, "router", axis=0, null=null)
    return None


def _router_leaves(spec: FamilySpec) -> tuple[str, ...]:
    """Name endings of the router tensors where the router wraps a named linear (Ergo's ``gate.linear``)."""
    return tuple(f".{spec.router_attr}.{spec.router_linear}.{leaf}" for leaf in ("weight", "bias"))


def pruned_config(spec: FamilySpec, config_dict: dict, kept: int) -> dict:
    """The config of a checkpoint pruned to ``kept`` experts per MoE layer.

    Updates the expert count; caps top-k at ``kept`` (plus the null experts, which stay); with group-limited routing the group count
    must still divide ``kept`` and ``topk_group`` is capped at the group count.

    Raises:
        KeepSetError: ``kept`` out of range or incompatible with expert groups.
    """
    cfg = {k: (dict(v) if isinstance(v, dict) else v) for k, v in config_dict.items()}
    E = config_value(cfg, spec.expert_keys)
    if E is None:
        raise UnsupportedModelError(f"The {spec.name} config has no expert count ({', '.join(spec.expert_keys)}).")
    if not 1 <= kept <= int(E):
        raise KeepSetError(f"Cannot keep {kept} experts per layer: the model has {E}.")

    def put(key: str, value: Any) -> None:
        parts = key.split(".")
        target = cfg
        for p in parts[:-1]:
            target = target.setdefault(p, {})
        if parts[-1] in target or len(parts) == 1:
            target[parts[-1]] = value

    for k in spec.expert_keys:
        v = get_path(cfg, k)
        if v is not None:
            put(k, [kept] * len(v) if isinstance(v, (list, tuple)) else kept)
    routable = kept + (null_experts(spec, cfg) if spec.null_routable else 0)   # null experts stay routable
    for k in spec.top_k_keys:
        v = get_path(cfg, k)
        if v is not None:
            put(k, [min(int(x), routable) for x in v] if isinstance(v, (list, tuple)) else min(int(v), routable))
    groups = routing_groups(spec, cfg)
    if groups > 1:
        if kept % groups:
            raise KeepSetError(
                f"This {spec.name} model routes in {groups} expert groups; keeping {kept} experts per layer "
                f"does not split evenly across groups.",
                hint=f"Keep a multiple of {groups} experts per layer, the same number from each group.")
        tg_key = spec.group_keys[1]
        if get_path(cfg, tg_key) is not None:
            put(tg_key, min(int(get_path(cfg, tg_key)), groups))
    return cfg
