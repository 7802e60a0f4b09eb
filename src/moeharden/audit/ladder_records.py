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
