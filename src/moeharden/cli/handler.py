"""The one error handler of the CLI, and the small helpers every command shares.

:func:`call` runs a library function and maps each :class:`~moeharden.errors.MoehardenError` to a
one-paragraph message and its exit code (``MOEHARDEN_DEBUG=1`` adds the traceback). Errors of the
operating system about the user's own files (a directory where a file is expected, a full disk, a
name too long, no permission) are input errors (exit 3), named with the path and the reason;
anything else is an internal error (exit 70: a bug, please report it). User-supplied text is escaped before it reaches Rich, so a ``[bold]``
or ``[/]`` in a path prints as written.
"""

from __future__ import annotations

import errno
import os
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import typer
from rich.markup import escape

from moeharden import console as ui
from moeharden.errors import EXIT_INPUT, EXIT_INTERRUPTED, MoehardenError

EXIT_INTERNAL = 70


def debug() -> bool:
    """Whether ``MOEHARDEN_DEBUG`` asks for tracebacks."""
    return os.environ.get("MOEHARDEN_DEBUG", "") not in ("", "0", "false", "False")


def esc(value: Any) -> str:
    """``str(value)`` with Rich markup escaped (for paths, names and messages from the user or a file)."""
    return escape(str(value))


def fail(title: str, message: str, hint: str | None, code: int) -> None:
    """Print (or, in JSON mode, emit) an error and exit with ``code``."""
    if ui.json_mode():
        ui.emit_json({"error": {"type": title, "message": message, "hint": hint, "exit_code": code}})
    text = f"[bold red]{esc(title)}:[/] {esc(message)}"
    if hint:
        text += f" [dim]Hint: {esc(hint)}[/]"
    ui.errors.print(text, soft_wrap=True)
    raise typer.Exit(code)


_OS_REASONS = {
    errno.ENOENT: "it does not exist",
    errno.EISDIR: "it is a directory where a file is expected",
    errno.ENOTDIR: "a part of it is a file where a directory is expected",
    errno.EEXIST: "it already exists",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.EROFS: "the file system is read-only",
    errno.ENOSPC: "the disk is full",
    errno.EDQUOT: "the disk quota is exceeded",
    errno.ENAMETOOLONG: "the name is too long",
    errno.ELOOP: "too many levels of symbolic links",
    errno.EXDEV: "it is on another file system",
}


def os_error_message(err: OSError) -> str:
    """One sentence for an operating-system error: which path, and why, in words."""
    reason = _OS_REASONS.get(err.errno or -1) or (err.strerror or type(err).__name__)
    paths = [p for p in (err.filename, err.filename2) if p is not None]
    where = " → ".join(str(p) for p in paths)
    return f"Cannot use {where}: {reason}." if where else f"A file operation failed: {reason}."


def call(fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Any:
    """Call a library function and map its errors to messages and exit codes (the one handler)."""
    try:
        return fn(*args, **kwargs)
    except MoehardenError as err:
        if debug():
            traceback.print_exc()
        fail(err.title, err.message, err.hint, err.exit_code)
    except KeyboardInterrupt:
        ui.console.print("[yellow]Interrupted.[/] Outputs are written atomically; nothing partial was left. "
                         "Finished work is kept beside --out: the same scan, verify or demo run again resumes "
                         "from it (entangle with --resume).")
        raise typer.Exit(EXIT_INTERRUPTED) from None
    except typer.Exit:
        raise
    except OSError as err:   # the user's files: a directory for a file, a full disk, a long name
        if debug():
            traceback.print_exc()
        fail("Input error", os_error_message(err), "Check the path, its permissions and the free space.", EXIT_INPUT)
    except RecursionError:
        fail("Input error", "An input nests too deeply to be read.", "Check the files you passed.", EXIT_INPUT)
    except Exception as err:  # a bug: still no traceback unless asked
        if debug():
            traceback.print_exc()
        first = str(err).splitlines()[0][:300] if str(err) else ""
        fail("Internal error (a bug: please report it)", f"{type(err).__name__}: {first}",
             "Re-run with MOEHARDEN_DEBUG=1 for the traceback and report it.", EXIT_INTERNAL)
    return None


def json_flag(flag: bool) -> None:
    """A command's own ``--json`` (the root ``moeharden --json`` sets the same mode)."""
    if flag:
        ui.set_json_mode(True)


def emit(result: Any) -> bool:
    """In JSON mode, emit ``result`` (its ``to_dict()`` when it has one) and return True.

    True too in a process of ``accelerate launch`` other than the first: it renders nothing (the
    first process writes the outputs and reports them).
    """
    if ui.secondary_process():
        return True
    if not ui.json_mode():
        return False
    ui.emit_json(result.to_dict() if hasattr(result, "to_dict") else result)
    return True


def push(out: Path, repo_id: str | None, what: str, public: bool) -> dict | None:
    """After a command has written ``out``: upload it when --push-to-hub was given (``out`` None:
    this process wrote nothing, see :func:`emit`)."""
    if not repo_id or out is None:
        return None
    from moeharden.io.hub import push_output

    res = call(push_output, out_dir=out, repo_id=repo_id, what=what, private=not public)
    info = res.to_dict() if hasattr(res, "to_dict") else {"repo_id": repo_id}
    if not ui.json_mode():
        ui.console.print(f"Pushed {esc(out)} to the Hub repo {esc(repo_id)} ({'public' if public else 'private'}).")
    return info
