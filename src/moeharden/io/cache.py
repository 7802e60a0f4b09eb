"""Where moeharden keeps what it can rebuild: the demo model, self-check results."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    """``$MOEHARDEN_CACHE``, else ``$XDG_CACHE_HOME/moeharden``, else ``~/.cache/moeharden``."""
    if os.environ.get("MOEHARDEN_CACHE"):
        return Path(os.environ["MOEHARDEN_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "moeharden"
