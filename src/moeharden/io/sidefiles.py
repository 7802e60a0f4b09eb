"""The one way to carry a checkpoint's other files into a new output (:func:`copy_side_files`).

It copies what a rewritten checkpoint keeps from its source (tokenizer, model card, task file and
data, generation config) and nothing that would be stale, unsafe or a leak: see
:data:`SIDE_FILE_SKIP` for the list and the function for the rules. :func:`allowed_roots` says where
a checkpoint's files may really live (itself, or a Hub cache snapshot's ``blobs`` folder).
"""

from __future__ import annotations

import os
import shutil
import stat
from collections.abc import Collection
from pathlib import Path

from moeharden.io.outputs import OUTPUT_MARKER

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
