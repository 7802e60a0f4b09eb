"""Output directories: the one atomic directory swap, and the one way to carry a checkpoint's other
files into a new output.

* :func:`atomic_output_dir` builds an output in a temporary sibling and swaps it into place at
  the end (:func:`replace_dir`); an interrupted run leaves the previous output intact. An existing
  directory is only replaced when it is empty or an earlier moeharden output, recognised by the
  :data:`OUTPUT_MARKER` file (:func:`check_output_dir`), so a mistyped ``--out`` never deletes data.
* :func:`copy_side_files` copies what a rewritten checkpoint keeps from its source (tokenizer, model
  card, task file and data, generation config) and nothing that would be stale, unsafe or a leak:
  see :data:`SIDE_FILE_SKIP` for the list and the function for the rules.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import uuid
from collections.abc import Collection, Iterator
from contextlib import contextmanager
from pathlib import Path

from moeharden.errors import InputError

OUTPUT_MARKER = ".moeharden-output"

# Top-level names never carried from a source checkpoint into a derived one (the names are spelled
# here because the io layer may not import the layers that define them; tests/test_outputs.py checks
# they still agree with attack.prune.PRUNE_RECORD, defend.lock.MANIFEST_NAME, defend.signing.SIGNATURE_NAME):
SIDE_FILE_SKIP: frozenset[str] = frozenset({
    "config.json",                      # the writer writes its own (pruned expert count, policy, ...)
    "model.safetensors.index.json",     # the writer's shards have their own index
    "pytorch_model.bin.index.json",     # an index of pickle weights: never read, never carried
    "moeharden-manifest.json",          # hashes of the *source* tensors: a lie about the new weights
    "model.sig",                        # the source's signature: invalid for the new directory
    "moeharden-prune.json",             # the source's prune record: the writer writes its own
    OUTPUT_MARKER,                      # written by atomic_output_dir itself
})
# Weight files of any format are never copied (the writer writes the weights; pickle is never carried).
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle", ".h5", ".msgpack",
                   ".gguf", ".npy", ".npz", ".onnx", ".joblib")
# Custom modelling code, copied only with trust_remote_code (code in a checkpoint is not data).
CODE_SUFFIXES = (".py", ".pyc", ".so")


def marker_kind(marker: Path) -> str | None:
    """The ``kind`` a moeharden marker file records (``journal``, ``entangle-checkpoints``); ``None``
    when ``marker`` is a link, not a regular file, unreadable, not moeharden's, or has no kind."""
    from moeharden.errors import MoehardenError
    from moeharden.io.files import read_json_object

    if Path(marker).is_symlink():
        return None
    try:
        doc = read_json_object(Path(marker), what="marker", max_bytes=4096)
    except (MoehardenError, OSError):
        return None
    kind = doc.get("kind")
    return kind if doc.get("tool") == "moeharden" and isinstance(kind, str) else None


def check_output_dir(out: Path, *, overwrite: bool = True, kind: str | None = None,
                     inputs: Collection[Path | str] = ()) -> None:
    """Fail early when ``out`` may not be (re)placed by :func:`atomic_output_dir`.

    Semantics: a missing ``out`` is created; an empty directory is replaced; a directory that an
    earlier run of the same command wrote (it holds the ``.moeharden-output`` marker, of the same
    ``kind``) is replaced when ``overwrite`` is true (the default: re-running a command refreshes
    its output); anything else — a file, a non-empty directory moeharden did not write, another
    command's output (a release, a baseline scan, a journal), or a directory that is or holds one
    of the command's own ``inputs`` — is refused, so a mistyped ``--out`` can never delete
    someone's data. A marker written before kinds were recorded (no ``kind``) counts as any kind.

    Args:
        out: the output directory.
        overwrite: whether an earlier moeharden output may be replaced.
        kind: what the command writes (``scan``, ``verify``, ``prune``, ``entangle``, ``lock``, …);
            recorded in the marker; ``None`` checks no kind.
        inputs: paths the command reads (checkpoint, baseline, keys, task files); those that exist
            locally must not be ``out`` or lie inside it.
    Raises:
        InputError: ``out`` is a file, a foreign non-empty directory, another command's output, one
            of the inputs or a directory holding one, or an earlier output while ``overwrite`` is false.
    """
    out = Path(out)
    if not out.exists():
        return
    if not out.is_dir():
        raise InputError(f"Output path {out} exists and is not a directory.", hint="Choose another --out.")
    _check_not_an_input(out, inputs)
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
        return
    if any(out.iterdir()):
        raise InputError(f"Output directory {out} exists, is not empty and was not written by moeharden; "
                         "refusing to replace it.", hint="Choose a new or empty --out directory.")


def _check_not_an_input(out: Path, inputs: Collection[Path | str]) -> None:
    """Refuse an ``out`` that is one of the inputs or holds one: replacing it would delete what the
    command reads (``verify --baseline scan/scan.json --out scan`` deleted the baseline)."""
    real = out.resolve()
    for inp in inputs:
        p = Path(inp)
        if not (p.exists() or p.is_symlink()):
            continue                                     # a Hub id, or nothing there
        q = p.resolve()
        if q == real or real in q.parents:
            raise InputError(f"Output directory {out} is or holds the input {p}; writing there would delete it.",
                             hint="Choose an --out outside the command's inputs.")


def prepare_files_dir(out: Path, names: Collection[str]) -> None:
    """Make ``out`` ready for moeharden to write the files ``names`` into it one by one (reports).

    A missing or empty ``out`` is created and marked as moeharden's; an earlier moeharden output
    (marked) may have those files replaced. A directory moeharden did not write is accepted only
    when none of ``names`` exists in it (nothing of the user's is overwritten) and is not marked, so
    it can never later be replaced as a whole.

    Args:
        out: the directory.
        names: the file names about to be written.
    Raises:
        InputError: ``out`` is a file, or a foreign directory already holding one of ``names``.
    """
    from moeharden import __version__

    out = Path(out)
    if out.exists() and not out.is_dir():
        raise InputError(f"Output path {out} exists and is not a directory.", hint="Choose another --out.")
    if out.is_dir() and (out / OUTPUT_MARKER).is_file():
        return
    if out.is_dir() and any(out.iterdir()):
        clash = sorted(n for n in names if (out / n).exists() or (out / n).is_symlink())
        if clash:
            raise InputError(f"{out} was not written by moeharden and already holds {', '.join(clash)}; "
                             "refusing to overwrite it.", hint="Choose a new or empty --out directory.")
        return
    out.mkdir(parents=True, exist_ok=True)
    (out / OUTPUT_MARKER).write_text(json.dumps({"tool": "moeharden", "version": __version__}) + "\n")


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
    if dest.exists():
        old = dest.with_name(f".{dest.name}.old-{uuid.uuid4().hex[:8]}")
        os.replace(dest, old)
        os.replace(tmp, dest)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, dest)


@contextmanager
def atomic_output_dir(out: Path, *, overwrite: bool = True, kind: str | None = None,
                      inputs: Collection[Path | str] = ()) -> Iterator[Path]:
    """Build an output directory in a temporary sibling, renamed into place at the end.

    Yields the temporary directory to fill, already holding the ``.moeharden-output`` marker (which
    records ``kind``); on success it replaces ``out`` (see :func:`check_output_dir` for when an
    existing ``out`` may be replaced, and for ``kind`` and ``inputs``; it is checked both before and
    after the work). On any exception, Ctrl-C included, the temporary directory is removed and
    ``out`` is left exactly as it was.

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
        check_output_dir(out, overwrite=overwrite, kind=kind, inputs=inputs)   # out may have appeared meanwhile
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    replace_dir(tmp, out)


def allowed_roots(src: Path) -> list[Path]:
    """Where a file of ``src`` may really live: ``src`` itself and, for a Hugging Face Hub cache
    snapshot (``models--o--n/snapshots/<rev>``, whose files are symlinks to ``../../blobs/<sha>``),
    that repository's ``blobs`` folder."""
    real = src.resolve()
    roots = [real]
    if real.parent.name == "snapshots" and (real.parent.parent / "blobs").is_dir():
        roots.append((real.parent.parent / "blobs").resolve())
    return roots


def _skipped(rel: Path, skip: Collection[str], trust_remote_code: bool) -> bool:
    name = rel.name
    if name.startswith("."):                     # .git, .cache/huggingface, tool bookkeeping, the marker
        return True
    if len(rel.parts) == 1 and name in skip:
        return True
    if name.lower().endswith(WEIGHT_SUFFIXES):
        return True
    return not trust_remote_code and name.lower().endswith(CODE_SUFFIXES)


def _copy_regular(real: Path, target: Path) -> bool:
    """Copy ``real`` to ``target`` if it is a regular file; False (nothing written) otherwise.

    The type is checked on the opened descriptor, not the path, so the file cannot be swapped for
    something else in between; ``O_NONBLOCK`` keeps a FIFO from blocking the open.
    """
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
    try:
        fd = os.open(real, flags)
    except OSError:                              # dangling, unreadable, or a link swapped in meanwhile
        return False
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode):
            return False
        target.parent.mkdir(parents=True, exist_ok=True)
        with open(target, "xb") as out:
            shutil.copyfileobj(f, out, 8 << 20)
    os.chmod(target, stat.S_IMODE(st.st_mode))
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns))
    return True


def copy_side_files(src: Path, dst: Path, *, skip: Collection[str] = SIDE_FILE_SKIP,
                    trust_remote_code: bool = False) -> list[str]:
    """Copy the files of checkpoint ``src`` that a derived checkpoint in ``dst`` keeps.

    Copied: every other file, subfolders included (tokenizer files, ``README.md``, the task file and
    its ``tasks/`` data, ``generation_config.json``, a chat template, ...). Never copied:

    * a top-level name in ``skip`` (default :data:`SIDE_FILE_SKIP`: config, weight indexes,
      manifest, signature, prune record, output marker; pass e.g. ``SIDE_FILE_SKIP | {"README.md"}``
      to add names the caller writes itself);
    * weights of any format (:data:`WEIGHT_SUFFIXES`), and hidden names (``.git``, ``.cache``);
    * custom code (``*.py`` and :data:`CODE_SUFFIXES`) unless ``trust_remote_code``;
    * anything that is not a regular file once resolved (FIFOs, sockets, devices), and any symlink
      that resolves outside ``src`` (or, for a Hub cache snapshot, outside its ``blobs`` folder):
      a hostile checkpoint cannot make the output carry ``~/.ssh/id_rsa`` or block on a FIFO;
      symlinked folders are not followed;
    * a path already present in ``dst`` (the writer's own file wins).

    A copied symlink becomes a plain file holding the target's content.

    Args:
        src: the source checkpoint directory.
        dst: the output directory being built (usually the one :func:`atomic_output_dir` yields).
        skip: top-level names not to copy.
        trust_remote_code: also copy custom code files.
    Returns:
        The copied paths, relative to ``dst``, in POSIX form, sorted.
    """
    src, dst = Path(src), Path(dst)
    roots = allowed_roots(src)
    copied: list[str] = []

    def walk(folder: Path) -> None:
        for entry in sorted(os.scandir(folder), key=lambda e: e.name):
            path = Path(entry.path)
            rel = path.relative_to(src)
            if _skipped(rel, skip, trust_remote_code):
                continue
            if entry.is_dir(follow_symlinks=False):
                walk(path)
                continue
            real = path.resolve()
            target = dst / rel
            if any(real.is_relative_to(r) for r in roots) and not target.exists() and _copy_regular(real, target):
                copied.append(rel.as_posix())

    walk(src)
    return sorted(copied)
