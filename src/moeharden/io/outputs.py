"""Output directories: the one atomic directory swap, and single files written into a directory.

* :func:`atomic_output_dir` builds an output in a temporary sibling and swaps it into place at
  the end (:func:`replace_dir`); an interrupted run leaves the previous output intact. An existing
  directory is only replaced when it is empty or an earlier moeharden output, recognised by the
  :data:`OUTPUT_MARKER` file (:func:`check_output_dir`), that holds nothing but the files the marker
  lists as written by moeharden, so a mistyped ``--out`` never deletes data. A link is never
  replaced nor written through, and an output never lies inside, is or holds one of its inputs.
* :func:`write_files` writes single files (reports) into a directory, each atomically, never over
  a file moeharden did not write and never through a link (:func:`prepare_files_dir` readies ``--out``).

The one way to carry a checkpoint's other files into a new output is :mod:`moeharden.io.sidefiles`.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Callable, Collection, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

from moeharden.errors import InputError

OUTPUT_MARKER = ".moeharden-output"
# A marker is small: its tool, version, kind and the list of paths moeharden wrote (bounded when read).
MARKER_MAX_BYTES = 1 << 20
# The signature of a locked release covers the marker (see atomic_output_dir); spelled here because
# the io layer may not import defend.signing (tests/test_outputs.py checks it agrees with SIGNATURE_NAME).
_SIGNATURE = "model.sig"

def _marker_doc(marker: Path) -> dict | None:
    """The JSON object of a moeharden marker; ``None`` when ``marker`` is a link, not a regular file,
    unreadable, too large or not moeharden's."""
    from moeharden.errors import MoehardenError
    from moeharden.io.files import read_json_object

    if Path(marker).is_symlink():
        return None
    try:
        doc = read_json_object(Path(marker), what="marker", max_bytes=MARKER_MAX_BYTES)
    except (MoehardenError, OSError):
        return None
    return doc if doc.get("tool") == "moeharden" else None


def marker_kind(marker: Path) -> str | None:
    """The ``kind`` a moeharden marker file records (``journal``, ``entangle-checkpoints``); ``None``
    when ``marker`` is a link, not a regular file, unreadable, not moeharden's, or has no kind."""
    doc = _marker_doc(marker)
    kind = doc.get("kind") if doc else None
    return kind if isinstance(kind, str) else None


def marker_files(marker: Path) -> frozenset[str] | None:
    """The paths (relative to the marker's directory, POSIX, directories included) that moeharden
    wrote there, as its marker records them; ``None`` when the marker records no list (written
    before lists were recorded, or by a signed output, see :func:`atomic_output_dir`) or is not
    moeharden's."""
    doc = _marker_doc(marker)
    files = doc.get("files") if doc else None
    if not isinstance(files, list) or not all(isinstance(f, str) for f in files):
        return None
    return frozenset(files)


def _walk(root: Path, enter: Callable[[str], bool]) -> Iterator[str]:
    """Every path under ``root`` (relative, POSIX), the top-level marker excepted; a directory is
    entered only when ``enter(its path)`` (links are never followed)."""
    for entry in sorted(os.scandir(root), key=lambda e: e.name):
        yield from _walk_entry(entry, "", enter)


def _walk_entry(entry: os.DirEntry, prefix: str, enter: Callable[[str], bool]) -> Iterator[str]:
    rel = prefix + entry.name
    if rel == OUTPUT_MARKER:
        return
    yield rel
    if entry.is_dir(follow_symlinks=False) and enter(rel):
        for sub in sorted(os.scandir(entry.path), key=lambda e: e.name):
            yield from _walk_entry(sub, rel + "/", enter)


def _tree(root: Path) -> list[str]:
    """Every path under ``root`` (directories included), the top-level marker excepted."""
    return list(_walk(Path(root), lambda rel: True))


def _foreign(out: Path, files: frozenset[str]) -> list[str]:
    """What ``out`` holds that is not in ``files`` (what moeharden wrote there); a directory that is
    not listed is reported as a whole and not entered, so the walk never leaves moeharden's tree."""
    return [rel for rel in _walk(Path(out), lambda rel: rel in files) if rel not in files]


def record_files(directory: Path, *, also: Collection[str] = (), default: dict | None = None) -> None:
    """Complete the marker of an output being built in ``directory`` with the list of what it holds
    (plus ``also``: names written after this call), as :func:`atomic_output_dir` does at its end.

    For a command that signs its output inside the block (the signature covers the marker, which
    may not change after it): call it just before signing, with ``also=("model.sig",)``. ``default``
    is the marker to complete when the one there is not moeharden's.
    """
    directory = Path(directory)
    doc = _marker_doc(directory / OUTPUT_MARKER) or default or {"tool": "moeharden"}
    _write_marker(directory, {**doc, "files": sorted(set(_tree(directory)) | set(also))})


def _write_marker(directory: Path, doc: dict) -> None:
    """(Re)write ``directory``'s marker atomically (temporary file + rename, never through a link)."""
    _write_atomically(Path(directory), {OUTPUT_MARKER: json.dumps(doc) + "\n"})


def check_output_dir(out: Path, *, overwrite: bool = True, kind: str | None = None,
                     inputs: Collection[Path | str] = ()) -> None:
    """Fail early when ``out`` may not be (re)placed by :func:`atomic_output_dir`.

    Semantics: a missing ``out`` is created; an empty directory is replaced; a directory that an
    earlier run of the same command wrote (it holds the ``.moeharden-output`` marker, of the same
    ``kind``) is replaced when ``overwrite`` is true (the default: re-running a command refreshes
    its output) and it holds nothing but what its marker lists as written by moeharden (a file the
    user added there is never deleted); anything else — a file, a symbolic link, a non-empty
    directory moeharden did not write, another command's output (a release, a baseline scan, a
    journal), or a directory that is, holds or lies inside one of the command's own ``inputs`` —
    is refused, so a mistyped ``--out`` can never delete or change someone's data. A marker written
    before kinds were recorded (no ``kind``) counts as any kind; one written before file lists were
    recorded (no ``files``, and signed releases, see :func:`atomic_output_dir`) is replaced as a whole.

    Args:
        out: the output directory.
        overwrite: whether an earlier moeharden output may be replaced.
        kind: what the command writes (``scan``, ``verify``, ``prune``, ``entangle``, ``lock``, …);
            recorded in the marker; ``None`` checks no kind.
        inputs: paths the command reads (checkpoint, baseline, keys, task files); those that exist
            locally must not be ``out``, lie inside it, or hold it (links resolved).
    Raises:
        InputError: ``out`` is a file or a link, a foreign non-empty directory, another command's
            output, an earlier output holding files moeharden did not write, one of the inputs, a
            directory holding one or inside one, or an earlier output while ``overwrite`` is false.
    """
    out = Path(out)
    _check_not_an_input(out, inputs)
    if out.is_symlink():        # replacing it would leave the user's link renamed beside the output
        raise InputError(f"Output path {out} is a symbolic link; moeharden never replaces a link nor writes "
                         "through one.", hint="Pass the directory it points to, or choose another --out.")
    if not out.exists():
        return
    if not out.is_dir():
        raise InputError(f"Output path {out} exists and is not a directory.", hint="Choose another --out.")
    marker = out / OUTPUT_MARKER
    if marker.is_file() and not marker.is_symlink():     # a linked marker is not one moeharden wrote
        if not overwrite:
            raise InputError(f"Output directory {out} already holds a moeharden output.",
                             hint="Remove it, choose another --out, or ask for overwriting.")
        had = marker_kind(marker)          # None: written before kinds were recorded (any kind)
        if kind is not None and had not in (None, kind):
            raise InputError(f"Output directory {out} holds a moeharden {had} output; refusing to replace it "
                             f"with a {kind} output.",
                             hint="Choose another --out (or remove that directory yourself if it is no longer needed).")
        files = marker_files(marker)
        # None: a marker from before file lists were recorded (or a signed release): replaceable as before
        extra = _foreign(out, files) if files is not None else []
        if extra:
            shown = ", ".join(extra[:5]) + (f" and {len(extra) - 5} more" if len(extra) > 5 else "")
            raise InputError(f"Output directory {out} holds an earlier moeharden output and also {shown}, which "
                             "moeharden did not write; refusing to replace it (that would delete them).",
                             hint="Move those files out of it, or choose another --out.")
        return
    if any(out.iterdir()):
        raise InputError(f"Output directory {out} exists, is not empty and was not written by moeharden; "
                         "refusing to replace it.", hint="Choose a new or empty --out directory.")


def _check_not_an_input(out: Path, inputs: Collection[Path | str]) -> None:
    """Refuse an ``out`` that is one of the inputs, holds one or lies inside one: replacing it would
    delete what the command reads (``verify --baseline scan/scan.json --out scan`` deleted the
    baseline), and writing inside it would change it (``verify rel --out rel/v`` broke the signed
    release). Links are resolved, for ``out`` (which need not exist) and for each input."""
    real = out.resolve()
    for inp in inputs:
        p = Path(inp)
        if not (p.exists() or p.is_symlink()):
            continue                                     # a Hub id, or nothing there
        q = p.resolve()
        if q == real or real in q.parents:
            raise InputError(f"Output directory {out} is or holds the input {p}; writing there would delete it.",
                             hint="Choose an --out outside the command's inputs.")
        if q in real.parents:
            raise InputError(f"Output directory {out} lies inside the input {p}; writing there would change "
                             "what the command reads.", hint="Choose an --out outside the command's inputs.")


def prepare_files_dir(out: Path, names: Collection[str], *, check_only: bool = False) -> None:
    """Make ``out`` ready for moeharden to write the files ``names`` into it with :func:`write_files`
    (reports), before any work.

    A missing or empty ``out`` is created and marked as moeharden's (the marker lists ``names``);
    in an existing directory each of ``names`` must be absent or a regular file moeharden wrote
    there (see :func:`check_files_writable`). A directory moeharden did not write is never marked,
    so it can never later be replaced as a whole.

    Args:
        out: the directory.
        names: the file names about to be written.
        check_only: only refuse what would be refused; create and mark nothing (call it again
            without it once the inputs are read).
    Raises:
        InputError: ``out`` is a file or a link, or one of ``names`` in it is a link, not a regular
            file, or a file moeharden did not write.
    """
    from moeharden import __version__

    out = Path(out)
    if out.is_symlink():
        raise InputError(f"Output path {out} is a symbolic link; moeharden never writes through one.",
                         hint="Pass the directory it points to, or choose another --out.")
    if out.exists() and not out.is_dir():
        raise InputError(f"Output path {out} exists and is not a directory.", hint="Choose another --out.")
    if out.is_dir() and any(out.iterdir()):
        check_files_writable(out, names)
        return
    if check_only:
        return
    out.mkdir(parents=True, exist_ok=True)
    _write_marker(out, {"tool": "moeharden", "version": __version__, "files": sorted(names)})


def check_files_writable(out: Path, names: Collection[str]) -> None:
    """Refuse to write any of the files ``names`` into the directory ``out`` where that would replace
    something moeharden did not write.

    A missing name is fine. An existing one must be a regular file (not a link, wherever it
    points) in a directory moeharden marked, whose marker lists it (a marker from before lists
    were recorded: any file); a user's ``report.md`` beside their ``scan.json`` is never replaced.

    Raises:
        InputError: naming the first path that may not be written.
    """
    out = Path(out)
    marker = out / OUTPUT_MARKER
    ours = _marker_doc(marker) is not None
    listed = marker_files(marker) if ours else None
    for name in names:
        p = out / name
        if p.is_symlink():
            raise InputError(f"{p} is a symbolic link; moeharden never writes through a link.",
                             hint="Remove the link, or choose another --out.")
        if not p.exists():
            continue
        if not p.is_file():
            raise InputError(f"{p} exists and is not a regular file; refusing to replace it.",
                             hint="Move it away, or choose another --out.")
        if not ours or (listed is not None and name not in listed):
            raise InputError(f"{p} was not written by moeharden; refusing to overwrite it.",
                             hint="Move it away, or choose a new or empty --out directory.")


def write_files(out: Path, contents: Mapping[str, str | bytes]) -> list[Path]:
    """Write each ``name: content`` of ``contents`` as the file ``out/name``, atomically.

    Checked first (:func:`check_files_writable`): nothing moeharden did not write is replaced and
    nothing is written through a link. Each file is written to a temporary file beside it (created
    exclusively, links not followed) and renamed over its name once all are written, so a reader
    never sees half a file and a failure leaves no temporary file. When ``out``'s marker lists the
    files moeharden wrote there, the new names are added to it.

    Args:
        out: the directory (created if missing).
        contents: file names (no ``/``) and their text or bytes.
    Returns:
        the written paths, in the order of ``contents``.
    Raises:
        InputError: see :func:`check_files_writable`.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    check_files_writable(out, list(contents))
    paths = _write_atomically(out, contents)
    marker = out / OUTPUT_MARKER
    doc, listed = _marker_doc(marker), marker_files(marker)
    if doc is not None and listed is not None and not set(contents) <= listed:
        _write_marker(out, {**doc, "files": sorted(listed | set(contents))})
    return paths


def _write_atomically(out: Path, contents: Mapping[str, str | bytes]) -> list[Path]:
    """Temporary files beside their targets, renamed over them once all are written."""
    temps: list[tuple[Path, Path]] = []
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
    try:
        for name, content in contents.items():
            if "/" in name or name in ("", ".", ".."):
                raise ValueError(f"not a file name: {name!r}")
            tmp = out / f".{name}.tmp-{uuid.uuid4().hex[:12]}"
            fd = os.open(tmp, flags, 0o666)                 # the umask decides the mode, as for write_text
            temps.append((tmp, out / name))
            with os.fdopen(fd, "wb") as f:
                f.write(content.encode() if isinstance(content, str) else content)
        for tmp, target in temps:
            os.replace(tmp, target)                         # replaces a name, never writes through a link
    finally:
        for tmp, _ in temps:
            if tmp.exists() or tmp.is_symlink():
                tmp.unlink()
    return [target for _, target in temps]


def temp_sibling(dest: Path) -> Path:
    """Create and return an empty hidden directory beside ``dest`` to build it in.

    A plain ``mkdir`` (not ``mkdtemp``, whose 0700 mode would stick to the renamed output): the
    umask decides the mode, as for any directory the user creates. The parent is created if needed.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.parent / f".{dest.name}.tmp-{uuid.uuid4().hex[:12]}"
    tmp.mkdir()
    return tmp


def replace_dir(tmp: Path, dest: Path) -> None:
    """Move the finished directory ``tmp`` to ``dest``, replacing what is there (the one swap).

    An existing ``dest`` is first renamed to a second sibling and removed only after ``tmp`` is in
    place, so a crash between the two renames leaves a complete copy on disk (the old one under
    ``.<name>.old-*``), never a half-written ``dest``. Both renames stay within one directory, hence
    one filesystem, so each is atomic.
    """
    tmp, dest = Path(tmp), Path(dest)
    if dest.is_symlink():       # renaming it away would leave the user's link behind as .<name>.old-*
        raise InputError(f"{dest} is a symbolic link; moeharden never replaces a link.",
                         hint="Pass the directory it points to, or choose another path.")
    if dest.exists():
        old = dest.with_name(f".{dest.name}.old-{uuid.uuid4().hex[:8]}")
        os.replace(dest, old)
        try:
            os.replace(tmp, dest)
        except BaseException:
            os.replace(old, dest)               # the previous output back in place
            raise
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, dest)


@contextmanager
def atomic_output_dir(out: Path, *, overwrite: bool = True, kind: str | None = None,
                      inputs: Collection[Path | str] = ()) -> Iterator[Path]:
    """Build an output directory in a temporary sibling, renamed into place at the end.

    Yields the temporary directory to fill, already holding the ``.moeharden-output`` marker (which
    records ``kind``); on success the marker is completed with the list of every path in the
    directory (``files``: what moeharden wrote, so that a later run replaces the output only while it
    holds nothing else) and the directory replaces ``out`` (see :func:`check_output_dir` for when an
    existing ``out`` may be replaced, and for ``kind`` and ``inputs``; it is checked both before and
    after the work). A signed output (``model.sig`` in it) keeps its marker as signed: the list is
    then the one :func:`record_files` wrote before signing, if any. On any exception, Ctrl-C included, the temporary directory is removed and ``out`` is left
    exactly as it was.

    Raises:
        InputError: see :func:`check_output_dir`.
    """
    from moeharden import __version__

    out = Path(out)
    check_output_dir(out, overwrite=overwrite, kind=kind, inputs=inputs)
    tmp = temp_sibling(out)
    marker = json.dumps({"tool": "moeharden", "version": __version__, **({"kind": kind} if kind else {})}) + "\n"
    try:
        # the marker is there from the start, so a signature made inside the block covers it (a
        # rewritten marker is a tamper like any other changed file)
        (tmp / OUTPUT_MARKER).write_text(marker)
        yield tmp
        if not (tmp / OUTPUT_MARKER).is_file():
            (tmp / OUTPUT_MARKER).write_text(marker)
        # a signature made inside the block covers the marker as it was: rewriting it would break the
        # release, so a signed output keeps the list recorded before signing (record_files), or none
        # (then it is replaced as a whole, like an output from before lists were recorded)
        if not (tmp / _SIGNATURE).exists():
            record_files(tmp, default=json.loads(marker))
        check_output_dir(out, overwrite=overwrite, kind=kind, inputs=inputs)   # out may have appeared meanwhile
        replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
