"""Derived figures of the ladder: labels to recover, curve areas and the two head starts.

For one task and attack (``labels`` or ``distill``):

* *labels to recover* of a curve: the first rung whose evaluation metric reaches the target
  (``target_fraction`` of the attacked full model's metric); ``None`` when no rung does;
* *area*: the mean over the ladder's rungs of the metric (higher-is-better metrics), or of
  ``full / metric`` (lower-is-better, so that the area is a fraction of the full model either way);
* the ``pruned`` figure is the *strongest* attacker over strategies and seeds (fewest labels,
  largest area) — the gate takes the worst seed for the defender; the references' figures are
  typical: the median over seeds of labels (``None`` counts as above the ladder) and the mean area;
* *expert head start*: what the kept experts add over ``shared`` — in labels (``shared − pruned``;
  ``labels_ratio = pruned / shared``) and in area (``pruned − shared``); *theft head start*: the
  same against ``scratch``.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence

INF = math.inf


def labels_needed(points: Sequence[dict], target: float, higher: bool) -> int | None:
    """The first rung (``x``) whose metric reaches ``target``; ``None`` if none does."""
    for p in points:
        if (p["metric"] >= target) if higher else (p["metric"] <= target):
            return int(p["x"])
    return None


def curve_area(points: Sequence[dict], full: float, higher: bool) -> float:
    """Mean metric over the rungs (lower-is-better: mean of ``full / metric``)."""
    vals = [p["metric"] if higher else (full / p["metric"] if p["metric"] else 0.0) for p in points]
    return sum(vals) / len(vals) if vals else float("nan")


def _median_labels(values: Sequence[int | None]) -> float | None:
    m = statistics.median([INF if v is None else v for v in values])
    return None if m == INF else float(m)


def _ratio(pruned: float | None, ref: float | None) -> float | None:
    """``pruned / ref``; ``None`` when it is undefined (either never recovered, or ``ref == 0``
    with ``pruned > 0``) — the gate then decides from the two label figures themselves."""
    if pruned is None or ref is None:
        return None
    if ref == 0:
        return 1.0 if pruned == 0 else None
    return pruned / ref


def summarize(curves: Sequence[dict], *, full: dict[str, float], higher: dict[str, bool],
              target_fraction: float) -> dict:
    """Per task and attack: each reference's figures and the two head starts.

    Args:
        curves: :class:`moeharden.attack.realign.ladder.LadderCurve` records (``to_dict()``).
        full: the attacked full model's metric per task.
        higher: whether each task's metric is higher-is-better.
        target_fraction: "recovered" means reaching this fraction of ``full``.
    Returns:
        ``{task: {"target": float, "attacks": {attack: {"top": int, "references": {ref: {...}},
        "expert_head_start": {...} | None, "theft_head_start": {...} | None}}}}``.
    """
    out: dict[str, dict] = {}
    for c in curves:
        t = c["task"]
        hib = higher[t]
        target = target_fraction * full[t] if hib else full[t] / target_fraction
        task_doc = out.setdefault(t, {"target": round(target, 6), "attacks": {}})
        att = task_doc["attacks"].setdefault(c["attack"], {"top": 0, "references": {}})
        att["top"] = max(att["top"], max(int(p["x"]) for p in c["points"]))
        ref = att["references"].setdefault(c["reference"], {"runs": []})
        ref["runs"].append({"strategy": c["strategy"], "seed": c["seed"],
                            "labels_to_recover": labels_needed(c["points"], target, hib),
                            "area": round(curve_area(c["points"], full[t], hib), 6)})
    for task_doc in out.values():
        for att in task_doc["attacks"].values():
            for name, ref in att["references"].items():
                runs = ref["runs"]
                if name == "pruned":      # the strongest attacker (the worst seed for the defender)
                    needs = [r["labels_to_recover"] for r in runs if r["labels_to_recover"] is not None]
                    ref["labels"] = float(min(needs)) if needs else None
                    ref["area"] = max(r["area"] for r in runs)
                else:                     # what the reference typically costs
                    ref["labels"] = _median_labels([r["labels_to_recover"] for r in runs])
                    ref["area"] = round(sum(r["area"] for r in runs) / len(runs), 6)
            refs = att["references"]
            for key, other in (("expert_head_start", "shared"), ("theft_head_start", "scratch")):
                if "pruned" not in refs or other not in refs:
                    att[key] = None
                    continue
                p, o = refs["pruned"], refs[other]
                att[key] = {
                    "labels": None if p["labels"] is None or o["labels"] is None else o["labels"] - p["labels"],
                    "labels_ratio": _ratio(p["labels"], o["labels"]),
                    "area": round(p["area"] - o["area"], 6),
                    "pruned_labels": p["labels"], "reference_labels": o["labels"],
                }
    return out
