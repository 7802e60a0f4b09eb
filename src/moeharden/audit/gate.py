"""The release gate: rows of (measured value, threshold, pass/fail) from a baseline and a re-attack.

The gate file is data (YAML, ``version: 1``, validated). Gate rows are computed from two scan-like
JSON documents — the baseline ``scan.json`` and the hardened model's re-attack — so a gate can be
recomputed from the reports alone.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from moeharden.errors import ConfigFileError


class Gate(BaseModel):
    """Thresholds of the release gate (see ``data/gate-default.yaml``)."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    version: Literal[1] = 1
    full_metric_min_fraction: float = Field(0.98, gt=0, le=1.5)
    max_above_chance_retained: float = Field(0.5, ge=0, le=1)
    max_keep_fraction: float = Field(0.5, gt=0, lt=1)
    min_labels_factor: float = Field(5.0, ge=1)
    require_manifest: bool = False


def load_gate(path: Path | None = None) -> Gate:
    """The default gate, overridden by a YAML gate file.

    Raises:
        ConfigFileError: unreadable YAML or invalid fields (all listed at once).
    """
    raw = yaml.safe_load(resources.files("moeharden").joinpath("data/gate-default.yaml").read_text())
    if path is not None:
        try:
            user = yaml.safe_load(Path(path).read_text()) or {}
        except FileNotFoundError:
            raise ConfigFileError(f"Gate file {path} does not exist.") from None
        except yaml.YAMLError as err:
            raise ConfigFileError(f"Gate file {path} is not valid YAML: {err}.") from None
        if not isinstance(user, dict):
            raise ConfigFileError(f"Gate file {path} must be a mapping of thresholds.")
        raw.update(user)
    try:
        return Gate(**raw)
    except ValidationError as err:
        lines = [f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in err.errors()]
        raise ConfigFileError(f"Gate file {path} has {len(lines)} problem(s): " + "; ".join(lines),
                              hint="Allowed keys are those of src/moeharden/data/gate-default.yaml.") from None


def _row(check: str, task: str | None, value: Any, threshold: Any, op: str, passed: bool, **extra) -> dict:
    return {"check": check, "task": task, "value": value, "threshold": threshold, "op": op,
            "pass": bool(passed), **extra}


def gate_rows(gate: Gate, baseline: dict, hardened: dict, *, integrity: dict | None = None) -> list[dict]:
    """Evaluate every gate row.

    Args:
        baseline: the baseline ``scan.json``.
        hardened: the hardened model's re-attack (same keys as a scan: tasks, sweep, labels_to_recover).
        integrity: the manifest check's result (``{"ok": bool, ...}``) or None when no manifest.
    """
    rows: list[dict] = []
    E = hardened["model"]["num_experts"]
    base_full = {t["name"]: t for t in baseline["tasks"]}
    for t in hardened["tasks"]:
        b = base_full.get(t["name"])
        if b is None:
            rows.append(_row("task_in_baseline", t["name"], False, True, "==", False))
            continue
        if t["metric"] == "perplexity":
            frac = b["full"] / t["full"] if t["full"] else 0.0
        else:
            frac = t["full"] / b["full"] if b["full"] else 0.0
        rows.append(_row("full_metric_fraction", t["name"], round(frac, 4), gate.full_metric_min_fraction, ">=",
                         frac >= gate.full_metric_min_fraction, hardened_full=t["full"], baseline_full=b["full"]))
    for t in hardened["tasks"]:
        for k in sorted({r["keep"] for r in hardened["sweep"] if r["task"] == t["name"]}):
            if k >= E or k > gate.max_keep_fraction * E:
                continue
            cells = [r for r in hardened["sweep"] if r["task"] == t["name"] and r["keep"] == k
                     and r.get("above_chance") is not None]
            if not cells:
                continue
            worst = max(cells, key=lambda r: r["above_chance"])
            rows.append(_row("worst_above_chance_retained", t["name"], round(worst["above_chance"], 4),
                             gate.max_above_chance_retained, "<=",
                             worst["above_chance"] <= gate.max_above_chance_retained, keep=k,
                             attack=worst["method"]))
    b_ltr, h_ltr = baseline.get("labels_to_recover") or {}, hardened.get("labels_to_recover") or {}
    first_round = max(1, int((baseline.get("recovery_settings") or {}).get("budget", 4)
                             // max(1, (baseline.get("recovery_settings") or {}).get("rounds", 4))))
    for task, h in h_ltr.items():
        b_vals = [v for v in (b_ltr.get(task) or {}).values() if v is not None]
        if not b_vals:
            continue   # the baseline never recovered within its budget: nothing to compare against
        base = max(min(b_vals), first_round)
        threshold = gate.min_labels_factor * base
        recovered = {s: v for s, v in h.items() if v is not None}
        if not recovered:
            rows.append(_row("labels_to_recover", task, None, threshold, ">= or not recovered", True,
                             baseline_labels=min(b_vals), note="not recovered within the budget by any attack"))
            continue
        best = min(recovered, key=recovered.get)
        rows.append(_row("labels_to_recover", task, recovered[best], threshold, ">= or not recovered",
                         recovered[best] >= threshold, baseline_labels=min(b_vals), attack=best))
    if integrity is not None:
        rows.append(_row("manifest_integrity", None, bool(integrity.get("ok")), True, "==", bool(integrity.get("ok"))))
    elif gate.require_manifest:
        rows.append(_row("manifest_present", None, False, True, "==", False))
    return rows
