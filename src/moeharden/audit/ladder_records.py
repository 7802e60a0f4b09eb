"""The typed ``ladder`` section of scan.json and verify.json (curves, references, head starts)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from moeharden.audit.base import Record


class LadderPointRecord(Record):
    """The attacker's chosen state at one rung of the ladder."""

    x: int = Field(ge=0, description="Labels bought (`labels` attack) or unlabelled prompts used (`distill`).")
    metric: float = Field(description="Evaluation-split metric of the chosen state.")
    lo: float | None = Field(description="Lower end of its 95% interval.")
    hi: float | None = Field(description="Upper end of its 95% interval.")
    val_metric: float | None = Field(description="The validation metric the choice was made on (never the "
                                                 "evaluation split).")
    lr: float | None = Field(description="Chosen learning rate (null at rung 0).")
    schedule: str | None = Field(description="Chosen schedule (`constant`, `cosine`).")
    steps: int = Field(ge=0, description="Chosen optimiser steps within this rung.")
    total_steps: int = Field(ge=0, description="Optimiser steps since the start of the trajectory.")
    labels_read: int = Field(ge=0, description="Distinct training examples the loss read so far (≤ x).")


class LadderCurveRecord(Record):
    """One learning curve: one attack from one starting point at one seed."""

    task: str = Field(description="Task name.")
    reference: Literal["pruned", "shared", "scratch"] = Field(
        description="Starting point: the stolen pruned copy; the non-expert weights with fresh experts and "
                    "router; a fresh model of the pruned architecture.")
    attack: Literal["labels", "distill"] = Field(description="Label attack, or label-free distillation from the "
                                                             "released full model.")
    mode: str = Field(description="What the attacker trains (`full`).")
    strategy: str = Field(description="Label-selection strategy (`random` for distill).")
    seed: int = Field(description="Attacker seed (also seeds a reference's fresh weights).")
    keep: int = Field(ge=0, description="Experts kept per MoE layer.")
    points: list[LadderPointRecord] = Field(description="One point per rung, rung 0 first.")
    seconds: float = Field(ge=0, description="Wall time of the curve.")


class HeadStart(Record):
    """What the pruned copy adds over a reference."""

    labels: float | None = Field(description="Reference labels − pruned labels to reach the target; null when "
                                             "either never reached it.")
    labels_ratio: float | None = Field(description="Pruned labels ÷ reference labels; null when undefined.")
    area: float = Field(description="Pruned area − reference area (mean metric over the ladder).")
    pruned_labels: float | None = Field(description="Pruned copy's labels (strongest strategy and seed), or null.")
    reference_labels: float | None = Field(description="Reference's labels (median over seeds), or null.")


class ReferenceRun(Record):
    """One curve's derived figures."""

    strategy: str = Field(description="Selection strategy.")
    seed: int = Field(description="Seed.")
    labels_to_recover: int | None = Field(description="First rung reaching the target, or null.")
    area: float = Field(description="Mean metric over the rungs (lower-is-better metrics: mean of full ÷ metric).")


class ReferenceSummary(Record):
    """A starting point's figures over its curves."""

    runs: list[ReferenceRun] = Field(description="Per curve.")
    labels: float | None = Field(description="`pruned`: fewest labels over strategies and seeds (the strongest "
                                             "attacker); references: median over seeds; null = never.")
    area: float = Field(description="`pruned`: largest area; references: mean area.")


class AttackSummary(Record):
    """One attack's figures on one task."""

    top: int = Field(ge=0, description="The ladder's largest rung.")
    references: dict[str, ReferenceSummary] = Field(description="`{reference: figures}`.")
    expert_head_start: HeadStart | None = Field(description="Pruned over `shared`: what the experts add.")
    theft_head_start: HeadStart | None = Field(description="Pruned over `scratch`: what stealing adds.")


class TaskLadder(Record):
    """One task's ladder summary."""

    target: float = Field(description="The recovery target: `target_fraction` of the attacked full model.")
    attacks: dict[str, AttackSummary] = Field(description="`{labels|distill: figures}`.")


class LadderSection(Record):
    """The adaptive attack on the budget ladder from three starting points (see docs/attacks-and-defenses.md)."""

    settings: dict[str, Any] = Field(description="The attack plan: references, strategies, seeds, validation "
                                                 "size, the ladder grid (rungs, prompt rungs, learning rates, "
                                                 "schedules, step checkpoints), keeps, target fraction.")
    fingerprint: dict[str, Any] = Field(description="What a later verify must match to reuse the `scratch` curves.")
    curves: list[LadderCurveRecord] = Field(description="Every curve, in plan order.")
    summary: dict[str, TaskLadder] = Field(description="`{task: figures}`: labels to recover, areas, head starts.")
    reused_scratch: bool = Field(description="The `scratch` curves were reused from the baseline (same "
                                             "architecture, splits and plan).")
    resumed_curves: int = Field(0, ge=0, description="Curves read back from the journal of an interrupted run "
                                                     "of the same inputs, not run again (0: every curve not "
                                                     "reused ran in this run). Each keeps the `seconds` it took "
                                                     "when it ran; the section's `seconds` counts this run only.")
    seconds: float = Field(ge=0, description="Wall time of the section (this run only; see `resumed_curves`).")


class HeadStartNullRow(Record):
    """One expert-head-start row at the physical limit: `shared` curves playing both sides."""

    task: str = Field(description="Task name.")
    attack: Literal["labels", "distill"] = Field(description="The attack of the row.")
    trials: int = Field(ge=1, description="Splits of the null's curves into a `pruned` and a disjoint `shared` group.")
    fail_rate: float = Field(ge=0, le=1, description="Share of the trials in which the gate's row fails: how "
                                                     "often it fails a pruned copy no better than fresh experts.")
    area_median: float = Field(description="Median over the trials of the row's area (pruned − shared).")
    area_max: float = Field(description="Largest area over the trials.")
    ratio_median: float | None = Field(description="Median labels ratio (null: no trial had one).")
    ratio_below: float = Field(ge=0, le=1, description="Share of the trials whose labels ratio is below the gate's "
                                                       "minimum.")
    measured_area: float | None = Field(description="The verify's own area for this row (null: not measured).")
    beyond_null: bool | None = Field(description="The measured area exceeds every trial's: a real head start, "
                                                 "not the row's own noise (null: not measured).")


class HeadStartNull(Record):
    """`verify --null-seeds N`: how often each expert-head-start row fails a defense at the limit
    (docs/attacks-and-defenses.md §5.5); the gate's verdict is unchanged."""

    seeds: int = Field(ge=2, description="`shared` curves per task and attack (seeds 1000…).")
    rows: list[HeadStartNullRow] = Field(description="One per task and attack.")
    all_pass_if_independent: float = Field(ge=0, le=1, description="The chance that every row passes a defense at "
                                                                   "the limit, were the rows independent.")
    curves: list[LadderCurveRecord] = Field(description="The null's `shared` curves.")
    seconds: float = Field(ge=0, description="Wall time of the null's curves.")
