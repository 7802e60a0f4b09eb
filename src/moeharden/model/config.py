"""The transformers config of a checkpoint directory (:func:`load_config`), read without its weights."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from moeharden.errors import CheckpointError


def load_config(path: Path, *, trust_remote_code: bool = False) -> Any:
    """The transformers config of a checkpoint directory.

    Raises:
        CheckpointError: an unreadable config or an architecture transformers does not know.
    """
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except Exception as err:   # transformers raises OSError, ValueError, TypeError and its own validation errors
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise CheckpointError(f"Cannot read the config in {path}: {first[:300]}",
                              hint="A custom architecture needs --trust-remote-code (only for code you trust).") from None
