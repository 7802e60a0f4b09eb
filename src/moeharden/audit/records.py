"""Read-side validators of the other commands' JSON records: the prune record, entangle.json, the manifest.

These models describe the current on-disk shape of ``moeharden-prune.json`` (``moeharden.prune/1``,
written by ``prune``), ``entangle.json`` (``moeharden.entangle/1``) and ``moeharden-manifest.json``
(``moeharden.manifest/1``, written by ``lock``). Readers validate with
:func:`moeharden.audit.documents.load_document`; the producers (attack/, defend/) still write plain
dicts of this shape, so the top level of each ignores keys it does not know.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import ConfigDict, Field

from moeharden.audit.documents import Record, ToolInfo

# Until their producers build these models, a key a producer adds must not make its own output
# unreadable: the top level of each record ignores unknown keys (their parts stay strict).
_PRODUCED_ELSEWHERE = ConfigDict(extra="ignore")


class ManifestSource(Record):
    """What a release was locked from."""

    path: str = Field(description="The checkpoint passed to `lock` (local path or Hub id).")


class SourceRef(Record):
    """The input checkpoint a record was derived from."""

    path: str = Field(description="The source checkpoint (local path or Hub id).")
    safetensors_digest: str = Field(description="Its layout digest (see `scan.json`'s `model`).")


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

    model_config = _PRODUCED_ELSEWHERE
    SCHEMA: ClassVar[str] = "moeharden.prune/1"
    omit_if_none: ClassVar[frozenset[str]] = frozenset({"recovery"})
    schema_id: Literal["moeharden.prune/1"] = Field("moeharden.prune/1", alias="schema",
                                                    description="`moeharden.prune/1`.")
    tool: ToolInfo = Field(description="The tool that wrote it.")
    source: SourceRef = Field(description="The checkpoint it was pruned from.")
    num_experts_before: int = Field(ge=1, description="Routed experts per MoE layer before pruning.")
    num_experts_after: int = Field(ge=1, description="Routed experts per MoE layer after pruning.")
    keep: dict[str, list[int]] = Field(description="`{\"<layer>\": [original expert ids kept]}`.")
    recovery: PruneRecovery | None = Field(None, description="Present after `prune --recover`.")


class EntangleRecord(Record):
    """`entangle.json`: how an entangled checkpoint was trained."""

    model_config = _PRODUCED_ELSEWHERE
    SCHEMA: ClassVar[str] = "moeharden.entangle/1"
    schema_id: Literal["moeharden.entangle/1"] = Field("moeharden.entangle/1", alias="schema",
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


class ManifestModel(Record):
    """The locked model's identity in a manifest."""

    family: str = Field(description="Registry family name.")
    model_type: str = Field(description="`config.json`'s `model_type`.")
    num_experts: int = Field(ge=1, description="Routed experts per MoE layer.")
    moe_layers: list[int] = Field(description="Decoder-layer indices of the MoE layers.")
    config_sha256: str = Field(description="sha256 of `config.json` in canonical form.")


class ManifestPolicy(Record):
    """The selective fine-tuning policy as written into the release."""

    version: int = Field(description="Policy format version.")
    license: str = Field(description="License of the release.")
    permitted_uses: str = Field(description="What licensees may do.")
    contact: str = Field(description="Who to ask.")
    groups: dict[str, str] = Field(description="`{parameter group: frozen | trainable | lora(max_rank: N)}`.")


class TensorEntry(Record):
    """One tensor of the release."""

    file: str = Field(description="The safetensors file holding it.")
    dtype: str = Field(description="Its dtype as stored.")
    shape: list[int] = Field(description="Its shape.")
    sha256: str = Field(description="sha256 of its bytes.")


class Fingerprints(Record):
    """Expert fingerprints, to recognise a release's experts in a derivative."""

    method: str = Field(description="How the sketches are computed.")
    dim: int = Field(ge=1, description="Sketch length.")
    experts: dict[str, dict[str, list[float]]] = Field(description="`{layer: {expert: unit-norm sketch}}`.")


class ManifestDocument(Record):
    """`moeharden-manifest.json`: every tensor's hash, expert fingerprints and the policy of a locked release."""

    model_config = _PRODUCED_ELSEWHERE
    SCHEMA: ClassVar[str] = "moeharden.manifest/1"
    schema_id: Literal["moeharden.manifest/1"] = Field("moeharden.manifest/1", alias="schema",
                                                       description="`moeharden.manifest/1`.")
    tool: ToolInfo = Field(description="The tool that wrote it.")
    model: ManifestModel = Field(description="The locked model's identity.")
    policy: ManifestPolicy | None = Field(description="The policy, or null.")
    tensors: dict[str, TensorEntry] = Field(description="`{tensor name: entry}`, sorted by name.")
    fingerprints: Fingerprints = Field(description="Expert fingerprints.")
    source: ManifestSource | None = Field(None, description="What the release was locked from.")
