"""Keep-sets: which original experts survive in each MoE layer.

File form (``KEEP.json``, also written as ``moeharden-prune.json``'s ``keep``)::

    {"keep": {"<decoder layer index>": [expert ids to keep], ...}}

Every MoE layer must be listed, with the same number of distinct, in-range experts.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from moeharden.errors import KeepSetError


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
        try:
            layer = int(k)
        except (TypeError, ValueError):
            problems.append(f"layer key {k!r} is not an integer")
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
    try:
        raw = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise KeepSetError(f"Keep file {path} does not exist.") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise KeepSetError(f"Keep file {path} is not valid JSON: {err}.") from None
    return parse_keep(raw, where=f"Keep file {path}", **kw)


def to_json(keep: dict[int, list[int]]) -> dict:
    return {"keep": {str(k): list(v) for k, v in sorted(keep.items())}}
