"""The single place that prints.

Everything user-facing goes through :data:`console` (stderr, Rich) or :func:`emit_json` (stdout,
plain JSON for pipelines), and only the CLI calls them. Library modules use :func:`progress_bar`
alone, which draws nothing in JSON mode or without a terminal, so the library stays silent.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from rich.console import Console


def secondary_process() -> bool:
    """A process of ``accelerate launch`` other than the first: it computes, the first one speaks."""
    return int(os.environ.get("WORLD_SIZE", "1") or 1) > 1 and int(os.environ.get("RANK", "0") or 0) != 0


console = Console(stderr=True, highlight=False, quiet=secondary_process())
errors = Console(stderr=True, highlight=False)     # errors are printed by every process

_state = {"json": False}


def set_json_mode(enabled: bool) -> None:
    """In JSON mode, human chatter and progress bars are suppressed; results go to stdout as JSON."""
    _state["json"] = enabled


def json_mode() -> bool:
    """Whether ``--json`` was given (results as JSON on stdout, no chatter)."""
    return _state["json"]


def emit_json(obj: Any) -> None:
    """Write one JSON document to stdout (by the first process of a launch only)."""
    if secondary_process():
        return
    sys.stdout.write(json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")
    sys.stdout.flush()


def info(message: str) -> None:
    """Print one line of Rich markup to stderr, unless in JSON mode."""
    if not _state["json"]:
        console.print(message)


@contextmanager
def progress_bar(description: str, total: int | None = None) -> Iterator[Any]:
    """A Rich progress bar; yields ``advance(n=1, **fields)``. Silent in JSON mode or without a TTY."""
    if _state["json"] or not console.is_terminal or secondary_process():
        def advance(n: int = 1, **_: Any) -> None:
            return None

        yield advance
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
        TimeElapsedColumn(), TextColumn("{task.fields[status]}"), console=console, transient=True,
    ) as prog:
        task = prog.add_task(description, total=total, status="")

        def advance(n: int = 1, **fields: Any) -> None:
            status = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in fields.items())
            prog.update(task, advance=n, status=status)

        yield advance
