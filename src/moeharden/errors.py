"""Typed errors raised by the library, and their exit codes.

The library never prints and never calls ``sys.exit``: it raises one of these. The CLI maps each
type to a one-paragraph message and an exit code in one place (``moeharden.cli.handler``):

====  =======================================================================
code  meaning
====  =======================================================================
0     success
1     verification failed (a gate row did not hold; a result, not an error)
2     usage error (bad option combination, missing option)
3     input error (bad checkpoint, task file, policy, keep-set, dataset)
4     integrity error (signature, manifest, tensor hash)
130   interrupted (Ctrl-C)
====  =======================================================================
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_VERIFY_FAILED = 1
EXIT_USAGE = 2
EXIT_INPUT = 3
EXIT_INTEGRITY = 4
EXIT_INTERRUPTED = 130


class MoehardenError(Exception):
    """Base class of every error the library raises on purpose.

    Args:
        message: what went wrong, one sentence or a short paragraph.
        hint: a concrete next step for the user (optional).
    """

    exit_code = EXIT_INPUT
    title = "Error"

    def __init__(self, message: str, *, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:  # pragma: no cover - trivial
        return self.message if not self.hint else f"{self.message} Hint: {self.hint}"


class UsageError(MoehardenError):
    """Options that cannot be combined, or a missing option."""

    exit_code = EXIT_USAGE
    title = "Usage error"


class InputError(MoehardenError):
    """Bad user input in general: files, options with bad values."""

    exit_code = EXIT_INPUT
    title = "Input error"


class CheckpointError(InputError):
    """A checkpoint that cannot be read: missing config, truncated or pickle-only weights, offline Hub id."""

    title = "Checkpoint error"


class UnsupportedModelError(InputError):
    """A model whose family is not a supported MoE (dense models included)."""

    title = "Unsupported model"


class KeepSetError(InputError):
    """A keep-set that asks for more experts than exist, for none, or unequal counts per layer."""

    title = "Invalid keep-set"


class TaskError(InputError):
    """A task file or preset that is invalid, unknown, empty or inconsistent."""

    title = "Task error"


class ConfigFileError(InputError):
    """A recipe, policy or gate YAML that fails validation (all problems listed at once)."""

    title = "Invalid configuration file"


class IntegrityError(MoehardenError):
    """A signature, manifest or tensor hash that does not match."""

    exit_code = EXIT_INTEGRITY
    title = "Integrity check failed"


class NetworkError(MoehardenError):
    """The Hub (or another remote) could not be reached."""

    exit_code = EXIT_INPUT
    title = "Network error"


class HubError(InputError):
    """The Hub refused a request: missing or rejected token, no write access, unknown namespace."""

    title = "Hub error"


class PolicyViolation(IntegrityError):
    """A selective fine-tuning policy was broken (a frozen parameter trained or changed)."""

    title = "Policy violation"


def validation_problems(err, *, label=None) -> list[str]:
    """Every problem of a pydantic ``ValidationError`` as ``"path: message"`` lines (the one formatter).

    Args:
        err: a ``pydantic.ValidationError``.
        label: optional ``label(loc) -> str | None`` adding a readable name after a list index
            (e.g. a task's name after ``tasks[2]``).
    Returns:
        One line per problem; the location ``(top level)`` when the error is about the whole document.
    """
    lines = []
    for e in err.errors():
        path = ""
        for i, part in enumerate(e["loc"]):
            if isinstance(part, int):
                path += f"[{part}]"
                extra = label(e["loc"][:i + 1]) if label else None
                path += f" ({extra})" if extra else ""
            else:
                path += ("." if path else "") + str(part)
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] not in ("missing", "extra_forbidden", "value_error") and "input" in e:
            msg += f" (got {e['input']!r:.60})"
        lines.append(f"{path or '(top level)'}: {msg}")
    return lines
