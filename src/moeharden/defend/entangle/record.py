"""``entangle.json``: the record of how an entangled checkpoint was trained, written beside its weights.

:func:`moeharden.defend.entangle.command.entangle` builds an :class:`EntangleRecord`; readers validate
it with :func:`moeharden.audit.documents.load_document`, and ``moeharden schema entangle`` prints its
JSON Schema.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import Field

from moeharden.io.records import Record, SourceRef, ToolInfo

ENTANGLE_RECORD = "entangle.json"
ENTANGLE_SCHEMA = "moeharden.entangle/1"


class EntangleRecord(Record):
    """`entangle.json`: how an entangled checkpoint was trained."""

    SCHEMA: ClassVar[str] = ENTANGLE_SCHEMA
    schema_id: Literal["moeharden.entangle/1"] = Field(ENTANGLE_SCHEMA, alias="schema",
                                                       description="`moeharden.entangle/1`.")
    tool: ToolInfo = Field(description="The tool that wrote it.")
    source: SourceRef = Field(description="The input checkpoint.")
    tasks: list[str] = Field(description="Task names trained on.")
    recipe: dict[str, Any] = Field(description="Every `EntangleRecipe` value used.")
    history: list[dict[str, float | int | str | None]] = Field(
        description="One entry per step: `step` and the loss terms (`retain`, `spread`, `prune`, averaged over "
                    "tasks; `recovery`, the simulated-recovery term after the attacker's steps, when "
                    "`recovery_term` is on).")
    seconds: float = Field(ge=0, description="Training wall time.")
