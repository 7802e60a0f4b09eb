"""The release gate: rows of (measured value, threshold, pass/fail) from a baseline and a re-attack.

The gate file is data (YAML, ``version: 1``, validated into :class:`~moeharden.audit.verdict.Gate`).
Gate rows are computed from two scan documents — the baseline ``scan.json`` and the hardened
model's re-attack — so a gate can be recomputed from the reports alone.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from moeharden.audit.documents import ScanDocument
from moeharden.audit.verdict import Gate, GateRow, IntegrityReport
from moeharden.errors import ConfigFileError, validation_problems


def load_gate(path: Path | None = None) -> Gate:
    """The default gate, overridden by a YAML gate file.

    Args:
        path: a gate YAML, or None for ``data/gate-default.yaml`` alone.
    Returns:
        the validated gate.
    Raises:
        ConfigFileError: unreadable YAML or invalid fields (all listed at once).
    """
    raw = yaml.safe_load(resources.files("moeharden").joinpath("data/gate-default.yaml").read_text())
    if path is not None:
        try:
            user = yaml.safe_load(Path(path).read_text()) or {}
        except FileNotFoundError:
            raise ConfigFileError(f"Gate file {path} does not exist.") from None
        except (OSError, UnicodeDecodeError) as err:
            raise ConfigFileError(f"Gate file {path} is unreadable: {err}.") from None
        except yaml.YAMLError as err:
            raise ConfigFileError(f"Gate file {path} is not valid YAML: {err}.") from None
        if not isinstance(user, dict):
            raise ConfigFileError(f"Gate file {path} must be a mapping of thresholds.")
        raw.update(user)
    try:
        return Gate(**raw)
    except ValidationError as err:
        lines = validation_problems(err)
        raise ConfigFileError(f"Gate file {path} has {len(lines)} problem(s): " + "; ".join(lines),
                              hint="Allowed keys are those of src/moeharden/data/gate-default.yaml.") from None


def _row(check: str, task: str | None, value: Any, threshold: Any, op: str, passed: bool, **extra) -> GateRow:
    return GateRow(check=check, task=task, value=value, threshold=threshold, op=op, passed=bool(passed), **extra)


def _full_metric_rows(gate: Gate, baseline: ScanDocument, hardened: ScanDocument) -> list[GateRow]:
    rows = []
    for t in hardened.tasks:
        b = baseline.task(t.name)
        if b is None:
            rows.append(_row("task_in_baseline", t.name, False, True, "==", False))
            continue
        if t.metric == "perplexity":    # lower is better: the fraction is baseline ÷ hardened
            frac = b.full / t.full if t.full else 0.0
        else:
            frac = t.full / b.full if b.full else 0.0
        rows.append(_row("full_metric_fraction", t.name, round(frac, 4), gate.full_metric_min_fraction, ">=",
                         frac >= gate.full_metric_min_fraction, hardened_full=t.full, baseline_full=b.full))
    return rows


def _pruning_rows(gate: Gate, hardened: ScanDocument) -> list[GateRow]:
    rows = []
    E = hardened.model.num_experts
    for t in hardened.tasks:
        for k in sorted({r.keep for r in hardened.sweep if r.task == t.name}):
            if k >= E or k > gate.max_keep_fraction * E:
                continue
            cells = [r for r in hardened.sweep if r.task == t.name and r.keep == k and r.above_chance is not None]
            if not cells:
                continue
            worst = max(cells, key=lambda r: r.above_chance)
            rows.append(_row("worst_above_chance_retained", t.name, round(worst.above_chance, 4),
                             gate.max_above_chance_retained, "<=",
                             worst.above_chance <= gate.max_above_chance_retained, keep=k, attack=worst.method))
    return rows


def _recovery_rows(gate: Gate, baseline: ScanDocument, hardened: ScanDocument) -> list[GateRow]:
    rows: list[GateRow] = []
    b_ltr, h_ltr = baseline.labels_to_recover or {}, hardened.labels_to_recover or {}
    rs = baseline.recovery_settings
    if rs is None:      # the baseline never ran the attack: there is no label count to compare against
        return rows
    first_round = max(1, rs.budget // rs.rounds)
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
    return rows


def gate_rows(gate: Gate, baseline: ScanDocument, hardened: ScanDocument, *,
              integrity: IntegrityReport | None = None) -> list[GateRow]:
    """Evaluate every gate row.

    Args:
        gate: the thresholds.
        baseline: the baseline ``scan.json``.
        hardened: the hardened model's re-attack (a scan document with the recovery sections).
        integrity: the manifest check's result, or None when the checkpoint has no manifest.
    Returns:
        the rows: full metric per task, worst above-chance retained per (task, K), labels to recover per
        task, then the manifest row.
    """
    rows = _full_metric_rows(gate, baseline, hardened) + _pruning_rows(gate, hardened)
    rows += _recovery_rows(gate, baseline, hardened)
    if integrity is not None:
        rows.append(_row("manifest_integrity", None, integrity.ok, True, "==", integrity.ok))
    elif gate.require_manifest:
        rows.append(_row("manifest_present", None, False, True, "==", False))
    return rows
