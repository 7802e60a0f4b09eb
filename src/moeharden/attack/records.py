"""``moeharden-prune.json``: the record a pruned checkpoint carries of where it came from and what it kept.

:func:`moeharden.attack.prune.prune_checkpoint` builds a :class:`PruneRecord`;
:func:`moeharden.attack.realign.pruned.recover_pruned` adds its ``recovery``. Readers validate it with
:func:`moeharden.audit.documents.load_document`, and ``moeharden schema prune`` prints its JSON Schema.
Kept free of torch so that reading a record stays cheap.
"""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field

from moeharden.io.records import Record, SourceRef, ToolInfo

PRUNE_RECORD = "moeharden-prune.json"
PRUNE_SCHEMA = "moeharden.prune/1"


class PruneRecovery(Record):
    """`prune --recover`: the re-alignment run applied to the pruned checkpoint."""

    task: str = Field(description="Task re-aligned on.")
    mode: str = Field(description="What was trained (`full`, `router`, `lora`, `distill`).")
    strategy: str = Field(description="Label-selection strategy.")
    budget: int = Field(ge=1, description="Label cap.")
    seed: int = Field(description="Seed of the run.")
    labels_used: int = Field(ge=0, description="Labels bought.")
    curve: list[tuple[int, float]] = Field(description="`[labels, metric]` after each round.")


class PruneRecord(Record):
    """`moeharden-prune.json`: which original experts a pruned checkpoint kept."""

    SCHEMA: ClassVar[str] = PRUNE_SCHEMA
    omit_if_none: ClassVar[frozenset[str]] = frozenset({"recovery"})
    schema_id: Literal["moeharden.prune/1"] = Field(PRUNE_SCHEMA, alias="schema", description="`moeharden.prune/1`.")
    tool: ToolInfo = Field(description="The tool that wrote it.")
    source: SourceRef = Field(description="The checkpoint it was pruned from.")
    num_experts_before: int = Field(ge=1, description="Routed experts per MoE layer before pruning.")
    num_experts_after: int = Field(ge=1, description="Routed experts per MoE layer after pruning.")
    keep: dict[str, list[int]] = Field(description="`{\"<layer>\": [original expert ids kept]}`.")
    recovery: PruneRecovery | None = Field(None, description="Present after `prune --recover`.")
