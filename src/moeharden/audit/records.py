"""The side documents the audit reads but does not write: the prune record, entangle.json, the manifest.

Each is a pydantic model defined beside its producer, which builds it and writes exactly its fields
(so their top level is strict again, like every other document):

* ``moeharden-prune.json`` (``moeharden.prune/1``): :class:`~moeharden.attack.records.PruneRecord`,
  written by ``prune`` (:mod:`moeharden.attack.prune`; its ``recovery`` by ``prune --recover``);
* ``entangle.json`` (``moeharden.entangle/1``): :class:`~moeharden.defend.entangle.record.EntangleRecord`,
  written by ``entangle``;
* ``moeharden-manifest.json`` (``moeharden.manifest/1``): :class:`~moeharden.defend.lock.ManifestDocument`,
  written by ``lock``.

They are imported here so that the audit's readers (:mod:`moeharden.audit.integrity`,
:mod:`moeharden.audit.schemas`) name them in one place; read them with
:func:`moeharden.audit.documents.load_document`.
"""

from __future__ import annotations

from moeharden.attack.records import PruneRecord, PruneRecovery
from moeharden.defend.entangle.record import EntangleRecord
from moeharden.defend.lock import (
    Fingerprints,
    ManifestDocument,
    ManifestModel,
    ManifestPolicy,
    ManifestSource,
    TensorEntry,
)
from moeharden.io.records import SourceRef

__all__ = ["EntangleRecord", "Fingerprints", "ManifestDocument", "ManifestModel", "ManifestPolicy",
           "ManifestSource", "PruneRecord", "PruneRecovery", "SourceRef", "TensorEntry"]
