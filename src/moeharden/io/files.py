"""Bounded reads of the small files a user or a checkpoint hands us (configs, indexes, policies,
task files, keep-sets): regular files only, a size cap, JSON without unbounded nesting.

A path that is a directory, a FIFO, a device (``/dev/zero``) or a socket is refused before a byte
is read, so a careless or hostile path can neither hang a command nor exhaust memory; every failure
is a typed :class:`~moeharden.errors.InputError` (or the subclass the caller asks for).
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import Any

from moeharden.errors import InputError, MoehardenError

MAX_SMALL_FILE = 64 << 20     # configs, indexes, policies, task files: far below this
MAX_JSON_DEPTH = 64           # no config, index or report nests deeper than a handful of levels


def open_regular(path: Path, *, what: str = "file", error: type[MoehardenError] = InputError):
    """Open ``path`` for binary reading only if it is a regular file (checked on the descriptor).

    ``O_NONBLOCK`` keeps a FIFO from blocking the open; the type is checked with ``fstat`` on the
    opened descriptor, so the path cannot be swapped in between.

    Args:
        path: the file.
        what: how to name it in messages (``"shard"``, ``"policy"``, ...).
        error: the error type to raise.
    Returns:
        An open binary file object (the caller closes it).
    Raises:
        ``error``: a missing path, a directory, a FIFO/device/socket, or an unreadable file.
    """
    path = Path(path)
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except FileNotFoundError:
        raise error(f"Cannot read {what} {path}: it does not exist.", hint="Check the path.") from None
    except IsADirectoryError:
        raise error(f"Cannot read {what} {path}: it is a directory, not a file.",
                    hint="Point at the file itself.") from None
    except OSError as err:
        raise error(f"Cannot read {what} {path}: {err.strerror or err}.") from None
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        kind = "a directory, not a file" if stat.S_ISDIR(mode) else "not a regular file (a FIFO, device or socket)"
        raise error(f"Cannot read {what} {path}: it is {kind}.", hint="Point at a regular file.")
    os.set_blocking(fd, True)
    return os.fdopen(fd, "rb")


def read_small_bytes(path: Path, *, what: str = "file", max_bytes: int = MAX_SMALL_FILE,
                     error: type[MoehardenError] = InputError) -> bytes:
    """The bytes of a small regular file, refusing anything larger than ``max_bytes``.

    Raises:
        ``error``: see :func:`open_regular`, or a file over ``max_bytes``.
    """
    with open_regular(path, what=what, error=error) as f:
        data = f.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise error(f"The {what} {path} is larger than {max_bytes} bytes; refusing to read it.")
    return data


def read_small_text(path: Path, *, what: str = "file", max_bytes: int = MAX_SMALL_FILE,
                    error: type[MoehardenError] = InputError) -> str:
    """:func:`read_small_bytes` decoded as UTF-8 text.

    Raises:
        ``error``: see :func:`read_small_bytes`, or bytes that are not UTF-8 text (a binary file).
    """
    data = read_small_bytes(path, what=what, max_bytes=max_bytes, error=error)
    if b"\x00" in data:
        raise error(f"The {what} {path} is a binary file, not text.", hint="Point at the text file.")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise error(f"The {what} {path} is not UTF-8 text.", hint="Save it as UTF-8.") from None


def json_depth_ok(text: str, max_depth: int = MAX_JSON_DEPTH) -> bool:
    """Whether the JSON text nests brackets at most ``max_depth`` deep (strings skipped; a cheap scan)."""
    depth, in_str, escaped = 0, False, False
    for ch in text:
        if in_str:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_str = False
        elif ch == '"':
            in_str = True
        elif ch in "[{":
            depth += 1
            if depth > max_depth:
                return False
        elif ch in "]}":
            depth -= 1
    return True


def parse_json(text: str, *, where: str, error: type[MoehardenError] = InputError,
               max_depth: int = MAX_JSON_DEPTH) -> Any:
    """``json.loads`` that refuses deep nesting and reports a typed error.

    Raises:
        ``error``: invalid JSON, or nesting deeper than ``max_depth``.
    """
    if not json_depth_ok(text, max_depth):
        raise error(f"{where} nests JSON deeper than {max_depth} levels; refusing to parse it.")
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise error(f"{where} is not valid JSON ({err.msg} at line {err.lineno}, column {err.colno}).") from None
    except RecursionError:
        raise error(f"{where} nests JSON too deeply.") from None


def read_json_object(path: Path, *, what: str = "JSON file", error: type[MoehardenError] = InputError,
                     max_bytes: int = MAX_SMALL_FILE) -> dict[str, Any]:
    """A small JSON file whose top level must be an object.

    Raises:
        ``error``: see :func:`read_small_text` and :func:`parse_json`, or a top level that is not an object.
    """
    raw = parse_json(read_small_text(path, what=what, max_bytes=max_bytes, error=error), where=str(path),
                     error=error)
    if not isinstance(raw, dict):
        raise error(f"{path} must hold a JSON object, not {type(raw).__name__}.")
    return raw


MAX_YAML_DEPTH = 64


def load_yaml_data(text: str, *, where: str, error: type[MoehardenError] = InputError,
                   max_depth: int = MAX_YAML_DEPTH) -> Any:
    """``yaml.safe_load`` of a config, bounded: no anchors or aliases, nesting at most ``max_depth``.

    Aliases are what make a 1 KB "billion laughs" document expand to gigabytes, and no recipe,
    policy, gate or task file needs them; refusing them (and deep nesting, which would exhaust the
    stack) keeps parsing linear in the size of the text. The event stream is checked first, then
    the document is loaded with the safe loader (no tags that build objects).

    Args:
        text: the YAML text.
        where: how to name the document in messages.
        error: the error type to raise.
        max_depth: the deepest nesting of mappings and sequences allowed.
    Returns:
        The plain data (dicts, lists, scalars; ``None`` for an empty document).
    Raises:
        ``error``: invalid YAML, an anchor or alias, or nesting deeper than ``max_depth``.
    """
    import yaml

    hint = "Configuration files are plain YAML data: no anchors (&a), aliases (*a) or tags such as !function."
    try:
        depth = 0
        for event in yaml.parse(text, Loader=yaml.SafeLoader):
            if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None):
                raise error(f"{where} uses YAML anchors or aliases, which are not allowed.", hint=hint)
            if isinstance(event, yaml.CollectionStartEvent):
                depth += 1
                if depth > max_depth:
                    raise error(f"{where} nests deeper than {max_depth} levels; refusing to parse it.")
            elif isinstance(event, yaml.CollectionEndEvent):
                depth -= 1
        return yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise error(f"{where} is not valid YAML: {err}", hint=hint) from None
    except RecursionError:
        raise error(f"{where} nests too deeply to be read.") from None
