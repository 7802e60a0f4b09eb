"""The base of every JSON document moeharden writes, at the bottom so that every producer can use it.

A document is a pydantic model built by the module that writes it (the prune record in
:mod:`moeharden.attack.prune`, ``entangle.json`` in :mod:`moeharden.defend.entangle.record`, the
manifest in :mod:`moeharden.defend.lock`, the reports in :mod:`moeharden.audit`) and validated by
every reader. :class:`Record` is strict (an unknown key is an error) and leaves chosen optional keys
out of the file when they are ``None``; :class:`ToolInfo` and :class:`SourceRef` are the parts several
documents share.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, model_serializer

from moeharden import __version__


class Record(BaseModel):
    """Base of every document part: unknown keys are errors; some optional keys are left out when None."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True, validate_assignment=True)
    omit_if_none: ClassVar[frozenset[str]] = frozenset()

    @model_serializer(mode="wrap")
    def _drop_absent(self, handler):
        data = handler(self)
        for key in self.omit_if_none:
            if key in data and data[key] is None:
                del data[key]
        return data

    def to_json(self) -> dict[str, Any]:
        """The on-disk JSON object (field names as in the file)."""
        return self.model_dump(by_alias=True)

    def to_file_text(self, *, indent: int = 2) -> str:
        """The file's text: the on-disk JSON object, indented, with a final newline."""
        return self.model_dump_json(by_alias=True, indent=indent) + "\n"


class ToolInfo(Record):
    """The tool that wrote a document."""

    name: Literal["moeharden"] = Field(description="Always `moeharden`.")
    version: str = Field(description="The moeharden version that wrote the document.")


def tool_info() -> ToolInfo:
    """This moeharden, as the writer of a document produced now."""
    return ToolInfo(name="moeharden", version=__version__)


class SourceRef(Record):
    """The input checkpoint a record was derived from."""

    path: str = Field(description="The source checkpoint (local path or Hub id).")
    safetensors_digest: str = Field(description="Its layout digest (see `scan.json`'s `model`).")
