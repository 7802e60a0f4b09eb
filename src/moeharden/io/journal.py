"""A long run's journal: its finished units of work, kept beside the output until the output is written.

``scan`` and ``verify`` spend most of their time in independent units (the ladder's learning curves,
each a fine-tuning run of tens of seconds to hours). Each finished unit is appended here at once.
A run stopped by Ctrl-C, an error or a killed machine leaves the journal behind; the next run of the
same command with the same output directory and the **same inputs** (the caller's fingerprint:
weights, tasks, keep-sets, plan, versions) reads the finished units back instead of running them
again, and removes the journal once its output is in place. A journal whose fingerprint differs is
never reused: it is emptied and started again.

Only what moeharden wrote is touched: the directory is claimed with the ``.moeharden-output`` marker
(one that holds anything else, or another moeharden output, is refused), the journal file is opened
without following a symbolic link (and refused when it has other hard links), and only a claimed
directory is ever removed. A torn last line (the process died mid-write) ends the journal: the
lines before it are kept.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import stat
from pathlib import Path

from moeharden.errors import InputError
from moeharden.io.outputs import OUTPUT_MARKER, marker_kind

SCHEMA = "moeharden.journal/1"
JOURNAL_FILE = "journal.jsonl"
MARKER_KIND = "journal"          # the kind in the directory's .moeharden-output marker
MAX_JOURNAL_BYTES = 256 * 1024 * 1024   # far above any ladder's curves (a curve record is a few KB)


def journal_dir(out: Path, kind: str) -> Path:
    """The hidden sibling of the output ``out`` that holds its journal: ``.<name>.<kind>-journal``."""
    out = Path(out)
    return out.with_name(f".{out.name}.{kind}-journal")


def _is_journal_marker(marker: Path) -> bool:
    """Whether ``marker`` is the marker a :class:`Journal` writes, not that of another moeharden output."""
    return marker_kind(marker) == MARKER_KIND


def check_journal_dir(directory: Path) -> None:
    """Fail early when ``directory`` is not moeharden's to write: a file or link, a non-empty
    directory without moeharden's marker, or another moeharden output (its marker is not a journal's).

    Raises:
        InputError: as above.
    """
    d = Path(directory)
    if d.is_symlink() or (d.exists() and not d.is_dir()):
        raise InputError(f"{d} exists and is not a directory moeharden wrote; it keeps the run's journal.",
                         hint="Move it away, or choose another --out.")
    marker = d / OUTPUT_MARKER
    if d.is_dir() and (marker.is_symlink() or (marker.exists() and not marker.is_file())):
        raise InputError(f"{marker} is not a file moeharden wrote; refusing to keep a journal beside it.",
                         hint="Move the directory away, or choose another --out.")
    if d.is_dir() and marker.exists() and not _is_journal_marker(marker):
        raise InputError(f"{d} holds another moeharden output (or a {OUTPUT_MARKER} moeharden did not write), not "
                         "a run's journal; refusing to keep a journal in it (it would be deleted at the end).",
                         hint="Move it away, or choose another --out.")
    if d.is_dir() and not marker.exists() and any(d.iterdir()):
        raise InputError(f"{d} is not empty and was not written by moeharden; refusing to keep a journal in it.",
                         hint="Move it away, or choose another --out.")


def remove_journal(directory: Path) -> bool:
    """Delete a journal directory moeharden claimed (its output is in place); returns whether it did.
    Anything else at that path is left alone."""
    d = Path(directory)
    if d.is_dir() and not d.is_symlink() and _is_journal_marker(d / OUTPUT_MARKER):
        shutil.rmtree(d, ignore_errors=True)
        return True
    return False


class Journal:
    """The finished units of one run, keyed by the caller's strings.

    Args:
        directory: where the journal lives (:func:`journal_dir`); created and claimed.
        fingerprint: what the units depend on; a journal written under another one is emptied.
    Raises:
        InputError: ``directory`` is not moeharden's (:func:`check_journal_dir`), the journal
            file is a link or not a regular file, or another run holds the journal (a lock).
    """

    def __init__(self, directory: Path, fingerprint: str):
        self.directory, self.fingerprint = Path(directory), fingerprint
        check_journal_dir(self.directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        marker = self.directory / OUTPUT_MARKER
        if marker.is_symlink() or (marker.exists() and not marker.is_file()):
            raise InputError(f"{marker} is not a file moeharden wrote; refusing to keep a journal beside it.",
                             hint="Move the directory away, or choose another --out.")
        if not marker.exists():
            fd = os.open(marker, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o644)
            with os.fdopen(fd, "w") as f:
                f.write(json.dumps({"tool": "moeharden", "kind": MARKER_KIND}) + "\n")
        self.path = self.directory / JOURNAL_FILE
        self.done: dict[str, dict] = {}
        try:
            self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0)
                               | getattr(os, "O_NONBLOCK", 0), 0o644)
        except OSError as err:
            raise InputError(f"Cannot open the run's journal {self.path}: {err.strerror or err}.",
                             hint="Move it away, or choose another --out.") from None
        try:
            st = os.fstat(self._fd)
            if not stat.S_ISREG(st.st_mode):
                raise InputError(f"{self.path} is not a regular file; refusing to use it as the run's journal.",
                                 hint="Move it away, or choose another --out.")
            if st.st_nlink != 1:        # a hard link: truncating or appending would change another file too
                raise InputError(f"{self.path} has other hard links (another file shares its contents); refusing "
                                 "to use it as the run's journal.", hint="Move it away, or choose another --out.")
            try:
                fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise InputError(f"Another moeharden run is writing the same output (its journal {self.directory} "
                                 "is in use).", hint="Wait for it to finish, or choose another --out.") from None
            good = self._read()
            if good == 0:          # new, another fingerprint's, or torn in its header: start again
                self.done = {}
                os.ftruncate(self._fd, 0)
                os.lseek(self._fd, 0, os.SEEK_SET)
                self._append({"schema": SCHEMA, "fingerprint": fingerprint})
            else:
                os.ftruncate(self._fd, good)        # drop a torn last line
                os.lseek(self._fd, good, os.SEEK_SET)
        except BaseException:
            os.close(self._fd)
            raise

    @property
    def resumed(self) -> int:
        """How many finished units were read back from an earlier run."""
        return len(self.done)

    def _read(self) -> int:
        """Read an earlier journal of this fingerprint into ``done``; the byte length of its good
        lines (0: none to keep)."""
        chunks, size = [], 0
        while size <= MAX_JOURNAL_BYTES:
            b = os.read(self._fd, 1 << 20)
            if not b:
                break
            chunks.append(b)
            size += len(b)
        if size > MAX_JOURNAL_BYTES:
            return 0
        good, header = 0, None
        for line in b"".join(chunks).splitlines(keepends=True):
            if not line.endswith(b"\n"):
                break
            try:
                item = json.loads(line)
            except (ValueError, RecursionError):       # torn, garbled or absurdly nested: the end
                break
            if not isinstance(item, dict):
                break
            if header is None:
                if item != {"schema": SCHEMA, "fingerprint": self.fingerprint}:
                    return 0
                header = item
            elif isinstance(item.get("key"), str) and isinstance(item.get("record"), dict):
                self.done[item["key"]] = item["record"]
            else:
                break
            good += len(line)
        return good

    def _append(self, item: dict) -> None:
        os.write(self._fd, (json.dumps(item, separators=(",", ":")) + "\n").encode())
        os.fsync(self._fd)

    def add(self, key: str, record: dict) -> None:
        """Record one finished unit (written and synced before this returns)."""
        self._append({"key": key, "record": record})
        self.done[key] = record

    def close(self) -> None:
        """Close the file; the journal stays for the next run."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def remove(self) -> None:
        """Close and delete the journal: the output it served is in place."""
        self.close()
        remove_journal(self.directory)

    def __enter__(self) -> Journal:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
