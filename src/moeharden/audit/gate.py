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
from moeharden.tasks.examples import higher_is_better


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
        from moeharden.io.files import (  # regular files only, bounded, no aliases
            load_yaml_data,
            read_small_text,
        )

        text = read_small_text(Path(path), what="gate file", error=ConfigFileError)
        user = load_yaml_data(text, where=f"Gate file {path}", error=ConfigFileError) or {}
        if not isinstance(user, dict):
            raise ConfigFileError(f"Gate file {path} must be a mapping of thresholds.")
        raw.update(user)
    try:
        return Gate(**raw)
    except ValidationError as err:
        lines = validation_problems(err)
        raise ConfigFileError(f"Gate file {path} has {len(lines)} problem(s): " + "; ".join(lines),
                              hint="Allowed keys are those of src/moeharden/data/gate-default.yaml.") from None


def _row(check: str, task: str | None, value: Any, threshold: Any, op: str, passed: bool | None, gate: Gate,
         **extra) -> GateRow:
    """A gate row; ``passed=None`` means inconclusive (holds only with ``allow_inconclusive``)."""
    status = "inconclusive" if passed is None else ("pass" if passed else "fail")
    ok = gate.allow_inconclusive if passed is None else bool(passed)
    return GateRow(check=check, task=task, value=value, threshold=threshold, op=op, passed=ok, status=status, **extra)


def _r(v: float | None) -> float | None:
    return None if v is None else round(float(v), 4)


def _full_metric_rows(gate: Gate, baseline: ScanDocument, hardened: ScanDocument) -> list[GateRow]:
    """Utility: the hardened model's conservative end (lower bound; perplexity: upper) against the baseline."""
    rows = []
    for t in hardened.tasks:
        b = baseline.task(t.name)
        if b is None:
            rows.append(_row("task_in_baseline", t.name, False, True, "==", None, gate,
                             note="the task is not in the baseline scan"))
            continue
        hib = higher_is_better(t.metric)
        lo = t.full_lo if t.full_lo is not None else t.full
        hi = t.full_hi if t.full_hi is not None else t.full
        if hib:     # the hardened lower bound over the baseline's metric
            frac, frac_hi = (lo / b.full, hi / b.full) if b.full else (0.0, 0.0)
        else:       # perplexity: baseline ÷ the hardened upper bound
            frac, frac_hi = (b.full / hi, b.full / lo) if hi and lo else (0.0, 0.0)
        rows.append(_row("full_metric_fraction", t.name, _r(frac), gate.full_metric_min_fraction, ">=",
                         frac >= gate.full_metric_min_fraction, gate, lo=_r(frac), hi=_r(frac_hi),
                         hardened_full=t.full, baseline_full=b.full))
    return rows


def _above_chance_lo(r, t) -> float | None:
    """The optimistic end of a sweep cell's above-chance retained: pruned lower over full upper bound."""
    if r.pruned_lo is None or t.full_hi is None or t.chance is None or not higher_is_better(t.metric):
        return r.above_chance
    den = t.full_hi - t.chance
    return (r.pruned_lo - t.chance) / den if den > 1e-9 else r.above_chance


def _pruning_rows(gate: Gate, hardened: ScanDocument) -> list[GateRow]:
    """Pruning: the worst attack's conservative above-chance retained (upper bound) at every gated K."""
    rows = []
    E = hardened.model.num_experts
    for t in hardened.tasks:
        for k in sorted({r.keep for r in hardened.sweep if r.task == t.name}):
            if k >= E or k > gate.max_keep_fraction * E:
                continue
            cells = [r for r in hardened.sweep if r.task == t.name and r.keep == k]
            scored = [(r.above_chance_hi if r.above_chance_hi is not None else r.above_chance, r) for r in cells]
            scored = [(v, r) for v, r in scored if v is not None]
            if not scored:      # no chance level, or the full model is not above chance: nothing checked
                rows.append(_row("worst_above_chance_retained", t.name, None, gate.max_above_chance_retained, "<=",
                                 None, gate, keep=k, note="the full model is not above chance (or the task has no "
                                                          "chance level): pruning cannot be judged"))
                continue
            v, worst = max(scored, key=lambda x: x[0])
            rows.append(_row("worst_above_chance_retained", t.name, _r(v), gate.max_above_chance_retained, "<=",
                             v <= gate.max_above_chance_retained, gate, keep=k, attack=worst.method,
                             lo=_r(_above_chance_lo(worst, t)), hi=_r(v)))
    return rows


def _at_chance(t) -> bool:
    """The full model is not (measurably) above chance on the task: nothing to steal, nothing to judge."""
    if not higher_is_better(t.metric):
        return False
    lo = t.full_lo if t.full_lo is not None else t.full
    return lo <= (t.chance or 0.0)


AT_CHANCE = "the full model is not above chance on this task: the attack cannot be judged"


def _ladder_attack(doc: ScanDocument, task: str, attack: str):
    if doc.ladder is None or task not in doc.ladder.summary:
        return None
    return doc.ladder.summary[task].attacks.get(attack)


def _recovery_rows(gate: Gate, baseline: ScanDocument, hardened: ScanDocument) -> list[GateRow]:
    """Re-alignment: labels the adaptive attacker needs on the ladder, against the baseline's."""
    rows: list[GateRow] = []
    for t in hardened.tasks:
        h, b = _ladder_attack(hardened, t.name, "labels"), _ladder_attack(baseline, t.name, "labels")
        if h is None:
            continue
        if _at_chance(t):
            rows.append(_row("labels_to_recover", t.name, None, None, ">=", None, gate, note=AT_CHANCE))
            continue
        first = min((p.x for c in hardened.ladder.curves if c.task == t.name for p in c.points if p.x > 0),
                    default=1)
        if b is None or "pruned" not in b.references:
            rows.append(_row("labels_to_recover", t.name, None, None, ">=", None, gate,
                             note="the baseline has no ladder for this task"))
            continue
        b_labels = b.references["pruned"].labels
        if b_labels is None:
            rows.append(_row("labels_to_recover", t.name, None, None, ">=", None, gate, baseline_labels=None,
                             note="the baseline never recovered on its ladder: nothing to compare against"))
            continue
        threshold = gate.min_labels_factor * max(b_labels, first)
        h_labels = h.references["pruned"].labels
        if h_labels is None:
            reached = h.top >= threshold
            rows.append(_row("labels_to_recover", t.name, None, threshold, ">= or not recovered",
                             True if reached else None, gate, baseline_labels=b_labels,
                             note=None if reached else f"not recovered, but the ladder stops at {h.top} labels, "
                                                       f"below the threshold"))
            continue
        # the ladder shows the attacker needed more than the rung below the one it recovered at and
        # at most that one: the row holds only when that interval's lower end meets the threshold
        below = max((p.x for c in hardened.ladder.curves if c.task == t.name and c.attack == "labels"
                     for p in c.points if p.x < h_labels), default=0)
        lo = below + 1 if h_labels > 0 else 0
        rows.append(_row("labels_to_recover", t.name, h_labels, threshold, ">= or not recovered",
                         lo >= threshold, gate, baseline_labels=b_labels, lo=float(lo), hi=float(h_labels),
                         note=None if lo >= threshold or h_labels < threshold else
                         f"recovered with {lo}–{h_labels:g} labels: the ladder cannot show {threshold:g} are needed"))
    return rows


def head_start_holds(gate: Gate, pruned_labels: float | None, reference_labels: float | None,
                     area: float) -> tuple[float | None, bool]:
    """The ``expert_head_start`` decision: ``(labels ratio pruned / shared or None, row holds)``.

    A pruned copy that never reached the target has no label head start; one that did where the
    reference did not has one (ratio 0); otherwise the ratio must reach the gate's minimum, and the
    area difference must stay within the gate's maximum either way.
    """
    p, s = pruned_labels, reference_labels
    if p is None:
        labels_ok, value = True, None
    elif s is None:
        labels_ok, value = False, 0.0
    else:
        value = 1.0 if s == 0 and p == 0 else (p / s if s else 0.0)
        labels_ok = value >= gate.expert_head_start_min_labels_ratio
    return value, labels_ok and area <= gate.expert_head_start_max_area


def _head_start_rows(gate: Gate, hardened: ScanDocument) -> list[GateRow]:
    """The expert head start per task and attack: pruned copy against the `shared` reference."""
    rows = []
    for t in hardened.tasks:
        for attack in ("labels", "distill"):
            a = _ladder_attack(hardened, t.name, attack)
            if a is None:
                continue
            if _at_chance(t):
                rows.append(_row("expert_head_start", t.name, None, gate.expert_head_start_min_labels_ratio, ">=",
                                 None, gate, attack=attack, note=AT_CHANCE))
                continue
            hs = a.expert_head_start
            if hs is None:
                rows.append(_row("expert_head_start", t.name, None, gate.expert_head_start_min_labels_ratio, ">=",
                                 None, gate, attack=attack, note="no `shared` reference was run"))
                continue
            p, s = hs.pruned_labels, hs.reference_labels
            value, holds = head_start_holds(gate, p, s, hs.area)
            rows.append(_row("expert_head_start", t.name, _r(value), gate.expert_head_start_min_labels_ratio,
                             ">= (labels ratio)", holds, gate, attack=attack,
                             pruned_labels=p, reference_labels=s, area=_r(hs.area),
                             area_threshold=gate.expert_head_start_max_area,
                             note=None if p is not None or s is not None else "neither reached the target"))
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
        the rows: full metric per task (lower bound), worst above-chance retained per (task, K) (upper
        bound), labels to recover per task on the ladder, the expert head start per (task, attack), then
        the manifest row. Rows that cannot be computed are ``inconclusive`` and fail unless the gate
        allows them.
    """
    rows = _full_metric_rows(gate, baseline, hardened) + _pruning_rows(gate, hardened)
    rows += _recovery_rows(gate, baseline, hardened) + _head_start_rows(gate, hardened)
    if integrity is not None:
        rows.append(_row("manifest_integrity", None, integrity.ok, True, "==", integrity.ok, gate))
    elif gate.require_manifest:
        rows.append(_row("manifest_present", None, False, True, "==", False, gate))
    return rows
