"""Bounded reads of the small files a user or a checkpoint hands us (configs, indexes, policies,
task files, keep-sets, report documents, manifests, signatures): regular files only, a size cap,
JSON and YAML without unbounded nesting, duplicate keys or integers too long to convert.

A path that is a directory, a FIFO, a device (``/dev/zero``) or a socket is refused before a byte
is read, so a careless or hostile path can neither hang a command nor exhaust memory; a file inside
a release is read without following a symlink (``follow_links=False``), so a release cannot make a
command open a file outside it. Every failure is a typed :class:`~moeharden.errors.InputError` (or
the subclass the caller asks for).
"""

from __future__ import annotations

import errno
import functools
import json
import os
import stat
import sys
from pathlib import Path
from typing import Any

from moeharden.errors import InputError, MoehardenError

MAX_SMALL_FILE = 64 << 20     # configs, indexes, policies, task files: far below this
# report documents (scan.json, verify.json), manifests and signatures: a manifest holds ~600 bytes per
# tensor plus the expert fingerprints, so the largest MoE checkpoints (10^5 tensors) stay far below it
MAX_DOCUMENT = 256 << 20
MAX_JSON_DEPTH = 64           # no config, index or report nests deeper than a handful of levels


def open_regular(path: Path, *, what: str = "file", error: type[MoehardenError] = InputError,
                 follow_links: bool = True):
    """Open ``path`` for binary reading only if it is a regular file (checked on the descriptor).

    ``O_NONBLOCK`` keeps a FIFO from blocking the open; the type is checked with ``fstat`` on the
    opened descriptor, so the path cannot be swapped in between. With ``follow_links=False`` the
    open uses ``O_NOFOLLOW``: a symlink at ``path`` is refused without opening what it points to.

    Args:
        path: the file.
        what: how to name it in messages (``"shard"``, ``"policy"``, ...).
        error: the error type to raise.
        follow_links: whether a symlink at ``path`` (its last component) is followed; False for a file
            inside a release, whose signature never covers a link.
    Returns:
        An open binary file object (the caller closes it).
    Raises:
        ``error``: a missing path, a directory, a FIFO/device/socket, a refused symlink, or an
            unreadable file.
    """
    path = Path(path)
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | (0 if follow_links else getattr(os, "O_NOFOLLOW", 0))
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        raise error(f"Cannot read {what} {path}: it does not exist.", hint="Check the path.") from None
    except IsADirectoryError:
        raise error(f"Cannot read {what} {path}: it is a directory, not a file.",
                    hint="Point at the file itself.") from None
    except OSError as err:
        if not follow_links and err.errno == errno.ELOOP:
            raise error(f"Cannot read {what} {path}: it is a symbolic link, and a file inside a release is "
                        "never read through a link.", hint="Replace the link with the file itself.") from None
        raise error(f"Cannot read {what} {path}: {err.strerror or err}.") from None
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        kind = "a directory, not a file" if stat.S_ISDIR(mode) else "not a regular file (a FIFO, device or socket)"
        raise error(f"Cannot read {what} {path}: it is {kind}.", hint="Point at a regular file.")
    os.set_blocking(fd, True)
    return os.fdopen(fd, "rb")


def read_small_bytes(path: Path, *, what: str = "file", max_bytes: int = MAX_SMALL_FILE,
                     error: type[MoehardenError] = InputError, follow_links: bool = True) -> bytes:
    """The bytes of a small regular file, refusing anything larger than ``max_bytes``.

    Raises:
        ``error``: see :func:`open_regular`, or a file over ``max_bytes``.
    """
    with open_regular(path, what=what, error=error, follow_links=follow_links) as f:
        data = f.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise error(f"The {what} {path} is larger than {max_bytes} bytes; refusing to read it.")
    return data


def read_small_text(path: Path, *, what: str = "file", max_bytes: int = MAX_SMALL_FILE,
                    error: type[MoehardenError] = InputError, follow_links: bool = True) -> str:
    """:func:`read_small_bytes` decoded as UTF-8 text.

    Raises:
        ``error``: see :func:`read_small_bytes`, or bytes that are not UTF-8 text (a binary file).
    """
    data = read_small_bytes(path, what=what, max_bytes=max_bytes, error=error, follow_links=follow_links)
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


class _DuplicateKey(Exception):
    """A key set twice in one JSON object or YAML mapping (``mark``: where, for YAML)."""

    def __init__(self, key: Any, mark: Any = None):
        super().__init__(key)
        self.key, self.mark = key, mark


def _unique_object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """``object_pairs_hook`` of :func:`parse_json`: a dict, refusing a key given twice."""
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise _DuplicateKey(key)
            seen.add(key)
    return obj


def _duplicate_message(where: str, err: _DuplicateKey, kind: str) -> str:
    at = f" (line {err.mark.line + 1})" if err.mark is not None else ""
    return (f"{where} sets the key {str(err.key)[:60]!r} twice in one {kind}{at}; "
            "refusing to guess which one counts.")


def conversion_message(where: str, err: ValueError) -> str:
    """Words for a ``ValueError`` a parser raised converting a value: an integer longer than Python
    converts (``sys.get_int_max_str_digits``), or a YAML timestamp that is no date."""
    if "integer string conversion" in str(err):
        limit = getattr(sys, "get_int_max_str_digits", lambda: 4300)()
        return f"{where} holds an integer longer than {limit} digits, which no setting needs."
    first = (str(err).splitlines() or [type(err).__name__])[0]
    return f"{where} holds a value that cannot be converted ({first[:200]})."


def parse_json(text: str, *, where: str, error: type[MoehardenError] = InputError,
               max_depth: int = MAX_JSON_DEPTH) -> Any:
    """``json.loads`` that refuses deep nesting, duplicate keys and overlong integers, with a typed error.

    A key given twice in one object would silently keep the later value (a keep-set layer, a policy
    rule), so it is refused; an integer of more digits than Python converts would otherwise escape
    as a bare ``ValueError``.

    Raises:
        ``error``: invalid JSON, nesting deeper than ``max_depth``, a key twice in one object, or an
            integer too long to convert.
    """
    if not json_depth_ok(text, max_depth):
        raise error(f"{where} nests JSON deeper than {max_depth} levels; refusing to parse it.")
    try:
        return json.loads(text, object_pairs_hook=_unique_object)
    except _DuplicateKey as err:
        raise error(_duplicate_message(where, err, "JSON object"), hint="Remove the duplicate key.") from None
    except json.JSONDecodeError as err:
        raise error(f"{where} is not valid JSON ({err.msg} at line {err.lineno}, column {err.colno}).") from None
    except ValueError as err:
        raise error(conversion_message(where, err)) from None
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


@functools.cache
def _unique_key_loader():
    """``yaml.SafeLoader`` that refuses a key given twice in one mapping (safe_load keeps the later one,
    which for a policy's ``groups`` would be the more permissive rule)."""
    import yaml

    class UniqueKeyLoader(yaml.SafeLoader):
        def construct_mapping(self, node, deep=False):
            if isinstance(node, yaml.MappingNode):
                seen = set()
                for key_node, _ in node.value:
                    if key_node.tag == "tag:yaml.org,2002:merge":
                        continue
                    key = self.construct_object(key_node, deep=deep)
                    try:
                        dup = key in seen
                        seen.add(key)
                    except TypeError:       # an unhashable key: SafeLoader's own error follows
                        continue
                    if dup:
                        raise _DuplicateKey(key, key_node.start_mark)
            return super().construct_mapping(node, deep=deep)

    return UniqueKeyLoader


def load_yaml_data(text: str, *, where: str, error: type[MoehardenError] = InputError,
                   max_depth: int = MAX_YAML_DEPTH) -> Any:
    """``yaml.safe_load`` of a config, bounded: no anchors or aliases, nesting at most ``max_depth``,
    no key twice in one mapping.

    Aliases are what make a 1 KB "billion laughs" document expand to gigabytes, and no recipe,
    policy, gate or task file needs them; refusing them (and deep nesting, which would exhaust the
    stack) keeps parsing linear in the size of the text. The event stream is checked first, then
    the document is loaded with the safe loader (no tags that build objects), refusing duplicate
    keys (``safe_load`` would silently keep the later value).

    Args:
        text: the YAML text.
        where: how to name the document in messages.
        error: the error type to raise.
        max_depth: the deepest nesting of mappings and sequences allowed.
    Returns:
        The plain data (dicts, lists, scalars; ``None`` for an empty document).
    Raises:
        ``error``: invalid YAML, an anchor or alias, nesting deeper than ``max_depth``, a key twice
            in one mapping, or a value that cannot be converted (an integer too long, a bad date).
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
        return yaml.load(text, Loader=_unique_key_loader())  # noqa: S506 - a SafeLoader subclass
    except _DuplicateKey as err:
        raise error(_duplicate_message(where, err, "mapping"), hint="Remove the duplicate key.") from None
    except yaml.YAMLError as err:
        raise error(f"{where} is not valid YAML: {err}", hint=hint) from None
    except ValueError as err:
        raise error(conversion_message(where, err)) from None
    except RecursionError:
        raise error(f"{where} nests too deeply to be read.") from None
