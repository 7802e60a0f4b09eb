"""The base of every typed report document: strict records, and the stamp of the tool that wrote them."""

from __future__ import annotations

import datetime as _dt
from typing import Any

from moeharden import __version__
from moeharden.io.records import Record, ToolInfo  # noqa: F401  (the one base, below every producer)


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def stamp() -> dict[str, Any]:
    """``tool`` and ``created`` of a document written now (producers pass ``**stamp()``)."""
    return {"tool": ToolInfo(name="moeharden", version=__version__), "created": _now()}
