"""Keep-sets: which original experts survive in each MoE layer.

File form (``KEEP.json``, also written as ``moeharden-prune.json``'s ``keep``)::

    {"keep": {"<decoder layer index>": [expert ids to keep], ...}}

Every MoE layer must be listed, with the same number of distinct, in-range experts. Beyond the
file form, a family's routing constrains keep-sets (Phi-MoE always routes to 2; group-limited
routing needs experts in every group): :func:`valid_keep`, :func:`check_keep_counts` and
:func:`check_group_balance` ask the registry for those facts.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from moeharden.errors import KeepSetError
from moeharden.model.registry import FamilySpec, config_value, routing_groups


def parse_keep(raw: Any, *, moe_layers: list[int], num_experts: int, where: str = "keep-set") -> dict[int, list[int]]:
    """Validate a keep mapping against a model's MoE layers; returns ``{layer: sorted ids}``.

    Raises:
        KeepSetError: every problem found, in one message.
    """
    if isinstance(raw, dict) and "keep" in raw:
        raw = raw["keep"]
    if not isinstance(raw, dict):
        raise KeepSetError(f'{where} must be {{"keep": {{"<layer>": [expert ids]}}}}.')
    problems: list[str] = []
    keep: dict[int, list[int]] = {}
    for k, ids in raw.items():
        # only canonical decimal keys: " 0", "+0", "00" and "0_0" would all be layer 0 for int()
        if not (isinstance(k, str) and re.fullmatch(r"0|[1-9][0-9]{0,8}", k)) and type(k) is not int:
            problems.append(f"layer key {str(k)[:20]!r} is not a layer number (a decimal integer such as \"3\")")
            continue
        layer = int(k)
        if layer in keep:
            problems.append(f"layer {layer} is given twice")
            continue
        if layer not in moe_layers:
            problems.append(f"layer {layer} is not an MoE layer")
            continue
        if not isinstance(ids, list) or not all(isinstance(e, int) and not isinstance(e, bool) for e in ids):
            problems.append(f"layer {layer}: expert ids must be a list of integers")
            continue
        if not ids:
            problems.append(f"layer {layer} keeps no expert")
            continue
        if len(set(ids)) != len(ids):
            problems.append(f"layer {layer} lists an expert twice")
        bad = [e for e in ids if not 0 <= e < num_experts]
        if bad:
            problems.append(f"layer {layer}: expert ids {bad} are outside 0..{num_experts - 1}")
        if len(set(ids)) > num_experts:
            problems.append(f"layer {layer} asks for {len(set(ids))} experts but the model has {num_experts}")
        keep[layer] = sorted(set(ids))
    missing = [layer for layer in moe_layers if str(layer) not in {str(k) for k in raw}]
    if missing:
        problems.append(f"MoE layer(s) {missing} are missing")
    counts = {len(v) for v in keep.values()}
    if len(counts) > 1:
        problems.append(f"layers keep different numbers of experts ({sorted(counts)}); physical pruning needs the "
                        "same number in every MoE layer")
    if problems:
        raise KeepSetError(f"{where} is invalid: " + "; ".join(problems) + ".",
                           hint=f"MoE layers are {moe_layers}, each with experts 0..{num_experts - 1}.")
    return keep


def read_keep_file(path: Path, **kw) -> dict[int, list[int]]:
    """Read and validate a KEEP.json file (see :func:`parse_keep`).

    Raises:
        KeepSetError: missing file, bad JSON, or an invalid keep-set.
    """
    from moeharden.io.files import parse_json, read_small_text  # regular files only, bounded, sane nesting

    text = read_small_text(Path(path), what="keep file", error=KeepSetError)
    raw = parse_json(text, where=f"Keep file {path}", error=KeepSetError)
    return parse_keep(raw, where=f"Keep file {path}", **kw)


def to_json(keep: dict[int, list[int]]) -> dict:
    """The file form ``{"keep": {"<layer>": [ids]}}`` of a keep-set, layers in ascending order."""
    return {"keep": {str(k): list(v) for k, v in sorted(keep.items())}}


def valid_keep(spec: FamilySpec, config: Any, keep: int) -> bool:
    """Whether ``keep`` experts per layer is a prunable count for this model (groups, minimums)."""
    E = int(config_value(config, spec.expert_keys))
    G = routing_groups(spec, config)
    if not spec.min_keep <= keep <= E or keep % G:
        return False
    if G == 1:
        return keep >= (spec.group_min if _group_scoring(spec, config) else 1)
    return keep // G >= spec.group_min and (keep // G) * _topk_group(spec, config) >= _top_k(spec, config, keep)


def _group_scoring(spec: FamilySpec, config: Any) -> bool:
    """Whether the router scores expert groups at all (DeepSeek-V3 style scores one group of all
    experts by its top 2 when ``n_group`` is 1, so it still needs 2 experts)."""
    if not spec.group_keys or config_value(config, (spec.group_keys[0],)) is None:
        return False
    return not (spec.groups_unless and config_value(config, (spec.groups_unless[0],)) == spec.groups_unless[1])


def _topk_group(spec: FamilySpec, config: Any) -> int:
    return int(config_value(config, (spec.group_keys[1],)) or 1) if spec.group_keys else 1


def _top_k(spec: FamilySpec, config: Any, kept: int) -> int:
    return min(int(config_value(config, spec.top_k_keys) or 1), kept)


def check_keep_counts(spec: FamilySpec, config: Any, keep: dict[int, list[int]], *, balanced: bool = True) -> None:
    """Counts the family's routing can run with; with ``balanced``, equal counts per routing group
    (physical pruning needs it; a mask on a loaded model does not).

    Raises:
        KeepSetError: too few experts kept, or unequal/too few per routing group.
    """
    for layer, ids in keep.items():
        if len(ids) < spec.min_keep:
            raise KeepSetError(f"Layer {layer} keeps {len(ids)} expert(s); {spec.name} routing needs at least "
                               f"{spec.min_keep}.")
    if balanced:
        check_group_balance(spec, config, keep)
    G = routing_groups(spec, config)
    if G == 1 and _group_scoring(spec, config):
        for layer, ids in keep.items():
            if len(ids) < spec.group_min:
                raise KeepSetError(f"Layer {layer} keeps {len(ids)} expert(s); {spec.name} scores its (single) "
                                   f"routing group by its top {spec.group_min}, so it needs at least that many.")
    if G > 1:
        E = int(config_value(config, spec.expert_keys))
        size = E // G
        for layer, ids in keep.items():
            per = [sum(1 for e in ids if e // size == g) for g in range(G)]
            if min(per) < spec.group_min:
                raise KeepSetError(f"Layer {layer} keeps {per} experts in its {G} routing groups; {spec.name} "
                                   f"scores groups by their top {spec.group_min} and needs at least that many in each.")
            # the router picks top-k only inside its topk_group best groups: those must hold enough
            tg = _topk_group(spec, config)
            if sum(sorted(per)[:tg]) < _top_k(spec, config, len(ids)):
                raise KeepSetError(f"Layer {layer} keeps {per} experts in its {G} routing groups; the router picks "
                                   f"{_top_k(spec, config, len(ids))} experts from its best {tg} group(s), "
                                   "which could hold fewer.", hint="Keep more experts in each routing group.")


def check_group_balance(spec: FamilySpec, config: Any, keep: dict[int, list[int]]) -> None:
    """With group-limited routing, every group must lose the same number of experts.

    Raises:
        KeepSetError: unequal removal across groups in some layer.
    """
    groups = routing_groups(spec, config)
    if groups <= 1:
        return
    E = int(config_value(config, spec.expert_keys))
    size = E // int(groups)
    for layer, ids in keep.items():
        counts = [sum(1 for e in ids if e // size == g) for g in range(int(groups))]
        if len(set(counts)) != 1:
            raise KeepSetError(
                f"Layer {layer} keeps {counts} experts from its {groups} routing groups; group-limited routing "
                "needs the same number kept in every group.",
                hint=f"Group g holds experts g*{size} .. g*{size}+{size - 1}; keep equally many from each.")
