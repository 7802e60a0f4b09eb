"""Streaming safetensors IO: an index of a checkpoint, one-shard-at-a-time reading, size-capped
writers, and atomic output directories.

Nothing here loads a whole model. Headers are parsed from the first bytes of each file (cheap
validation: truncation, offsets past the end, sizes that disagree with shapes). Two writers:

* :func:`write_streaming_shards` plans every output shard from shapes known up front, writes each
  header first and then the tensors one at a time, copying unchanged byte ranges file to file in
  the kernel; peak memory is one sliced tensor at most (what ``prune`` uses).
* :class:`ShardWriter` buffers tensors up to the size cap and flushes a shard when the next tensor
  would pass it; peak memory is about one output shard plus one tensor.

Output directories are built in a temporary sibling and renamed into place
(:func:`atomic_output_dir`); an existing directory is only replaced when it is empty or an earlier
moeharden output (:func:`check_output_dir`).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from moeharden.errors import CheckpointError, InputError

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
OUTPUT_MARKER = ".moeharden-output"
# bits per element of every safetensors dtype (sub-byte F4/F6 are packed)
_DTYPE_BITS = {"F64": 64, "F32": 32, "F16": 16, "BF16": 16, "I64": 64, "I32": 32, "I16": 16, "I8": 8, "U8": 8,
               "BOOL": 8, "F8_E4M3": 8, "F8_E5M2": 8, "F8_E8M0": 8, "U16": 16, "U32": 32, "U64": 64, "C64": 64,
               "F6_E2M3": 6, "F6_E3M2": 6, "F4": 4}


def dtype_nbytes(dtype: str, shape: tuple[int, ...] | list[int]) -> int:
    """Bytes a tensor of safetensors ``dtype`` and ``shape`` occupies on disk.

    Raises:
        CheckpointError: a dtype safetensors does not define.
    """
    if dtype not in _DTYPE_BITS:
        raise CheckpointError(f"Unknown safetensors dtype {dtype!r}.")
    count = 1
    for d in shape:
        count *= int(d)
    return (count * _DTYPE_BITS[dtype] + 7) // 8


@dataclass(frozen=True)
class TensorInfo:
    """One tensor's header entry: dtype, shape and absolute byte range in its file."""

    name: str
    file: Path
    dtype: str
    shape: tuple[int, ...]
    start: int   # absolute offset of the first data byte in the file
    end: int     # absolute offset past the last data byte


def read_header(path: Path) -> tuple[dict, int]:
    """Parse a safetensors header without reading tensor data.

    Returns:
        (header dict, absolute offset where tensor data begins).
    Raises:
        CheckpointError: truncated file, oversized or malformed header, data beyond the file end.
    """
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise CheckpointError(f"{path.name} is truncated (only {size} bytes): not a safetensors file.")
        (n,) = struct.unpack("<Q", raw)
        if n <= 0 or 8 + n > size or n > 100_000_000:
            raise CheckpointError(f"{path.name} has a corrupt or truncated header (declares {n} bytes, file has {size}).",
                                  hint="Re-download or re-save the checkpoint.")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise CheckpointError(f"{path.name} has an unreadable safetensors header.") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path.name} has a malformed safetensors header.")
    base = 8 + n
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        try:
            start, end = (int(v) for v in meta["data_offsets"])
            nbytes = dtype_nbytes(meta["dtype"], meta["shape"])
        except CheckpointError as err:
            raise CheckpointError(f"{path.name}: tensor {name!r}: {err.message}") from None
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{path.name}: tensor {name!r} has a malformed header entry.") from None
        if start < 0 or base + end > size or end - start != nbytes:
            raise CheckpointError(f"{path.name} is truncated or corrupt: tensor {name!r} lies beyond the end of the file "
                                  f"or its size disagrees with its shape.", hint="Re-download or re-save the checkpoint.")
    return header, base


class CheckpointFiles:
    """Index of a local safetensors checkpoint: one ``model.safetensors`` or shards with an index.

    Raises:
        CheckpointError: no safetensors files, an index naming missing shards, a corrupt header.
    """

    def __init__(self, root: Path):
        self.root = Path(root)
        index = self.root / INDEX_NAME
        if index.exists():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError):
                raise CheckpointError(f"{index} is not a valid safetensors index.") from None
            names = sorted(set(weight_map.values()))
            missing = [n for n in names if not (self.root / n).exists()]
            if missing:
                raise CheckpointError(f"The index names shard(s) that are missing: {', '.join(missing)}.",
                                      hint="The download is incomplete; fetch the missing files.")
            self.shards = [self.root / n for n in names]
        else:
            self.shards = sorted(self.root.glob("*.safetensors"))
        if not self.shards:
            raise CheckpointError(f"No safetensors weights in {self.root}.")
        self.tensors: dict[str, TensorInfo] = {}
        self.metadata: dict[str, dict] = {}
        for shard in self.shards:
            header, base = read_header(shard)
            self.metadata[shard.name] = header.get("__metadata__", {}) or {}
            for name, meta in header.items():
                if name == "__metadata__":
                    continue
                s, e = meta["data_offsets"]
                self.tensors[name] = TensorInfo(name, shard, meta["dtype"], tuple(meta["shape"]), base + s, base + e)

    @property
    def tensor_names(self) -> list[str]:
        return list(self.tensors)

    def shard_of(self, name: str) -> Path:
        return self.tensors[name].file

    def largest_shard_bytes(self) -> int:
        return max(p.stat().st_size for p in self.shards)

    def total_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.shards)


def iter_shard_tensors(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(name, tensor)`` of one shard, one tensor at a time (memory-mapped reads)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        for name in f.keys():
            yield name, f.get_tensor(name)


_TORCH_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                 "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
                 "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}


def read_tensor(info: TensorInfo, handle=None) -> torch.Tensor:
    """Read one tensor with a plain positioned read (no memory map: only this tensor is resident).

    Args:
        handle: an open binary file of ``info.file`` to reuse (one input shard open at a time).
    """
    own = handle is None
    f = open(info.file, "rb") if own else handle
    try:
        f.seek(info.start)
        buf = bytearray(f.read(info.end - info.start))
    finally:
        if own:
            f.close()
    dtype = _TORCH_DTYPES[info.dtype]
    if not buf:
        return torch.empty(info.shape, dtype=dtype)
    return torch.frombuffer(buf, dtype=dtype).reshape(info.shape)


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """The raw little-endian bytes of a tensor, without a copy when it is already contiguous."""
    t = t.detach().contiguous().reshape(-1)
    return memoryview(t.view(torch.uint8).numpy()) if t.numel() else memoryview(b"")


@dataclass(frozen=True)
class PlannedTensor:
    """An output tensor known before its data is read: name, safetensors dtype, shape, byte size."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    nbytes: int


def write_streaming_shards(out_dir: Path, plan: list[PlannedTensor], produce, max_shard_bytes: int,
                           metadata: dict[str, str] | None = None) -> list[Path]:
    """Write tensors straight to disk, one at a time, in ``plan`` order, into size-capped shards.

    Shapes and dtypes are known up front, so every shard's header is written first and each
    tensor's bytes follow as ``produce(planned)`` returns them: a tensor, or a list of
    ``(file, offset, length)`` byte ranges copied file-to-file by the kernel (``copy_file_range``,
    no user-space buffer). Nothing but the current tensor is ever held in memory. Writes
    ``model.safetensors`` (one shard) or numbered shards plus an index.
    """
    meta = {"format": "pt", **(metadata or {})}
    groups: list[list[PlannedTensor]] = [[]]
    size = 0
    for p in plan:
        if groups[-1] and size + p.nbytes > max_shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(p)
        size += p.nbytes
    n = len(groups)
    paths, weight_map, total = [], {}, 0
    for i, group in enumerate(groups):
        name = SINGLE_NAME if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        header: dict = {"__metadata__": meta}
        off = 0
        for p in group:
            header[p.name] = {"dtype": p.dtype, "shape": list(p.shape), "data_offsets": [off, off + p.nbytes]}
            off += p.nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)                     # data starts 8-byte aligned
        path = Path(out_dir) / name
        with open(path, "wb") as f:
            f.write(struct.pack("<Q", len(raw)))
            f.write(raw)
            for p in group:
                item = produce(p)
                if isinstance(item, torch.Tensor):
                    data = tensor_bytes(item)
                    if data.nbytes != p.nbytes:
                        raise RuntimeError(f"{p.name}: produced {data.nbytes} bytes, planned {p.nbytes}")
                    f.write(data)
                else:
                    if sum(n for _, _, n in item) != p.nbytes:
                        raise RuntimeError(f"{p.name}: byte ranges do not add up to {p.nbytes}")
                    f.flush()
                    for src, start, length in item:
                        copy_range(src, start, length, f)
                weight_map[p.name] = name
        total += off
        paths.append(path)
    if n > 1:
        (Path(out_dir) / INDEX_NAME).write_text(json.dumps(
            {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}, indent=2) + "\n")
    return paths


def copy_range(src, start: int, length: int, out) -> None:
    """Append ``length`` bytes of the open binary file ``src`` from ``start`` to the open file ``out``.

    Uses the kernel's file-to-file copy where there is one, else a small bounded buffer.
    """
    out_fd, in_fd = out.fileno(), src.fileno()
    done = 0
    if hasattr(os, "copy_file_range"):
        try:
            while done < length:
                n = os.copy_file_range(in_fd, out_fd, length - done, start + done)
                if n == 0:
                    break
                done += n
            out.seek(0, os.SEEK_END)
        except OSError:
            pass
    src.seek(start + done)
    while done < length:                      # portable fallback, 8 MiB at a time
        chunk = src.read(min(8 << 20, length - done))
        if not chunk:
            raise CheckpointError(f"{getattr(src, 'name', 'input')} ended early while copying.")
        out.write(chunk)
        done += len(chunk)


def parse_size(text: str | int) -> int:
    """``"2GB"``, ``"500MB"``, ``"20KB"``, ``"1GiB"`` or an int → bytes.

    Raises:
        InputError: an unreadable size.
    """
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B?)\s*", str(text), re.IGNORECASE)
    if not m:
        raise InputError(f"Cannot read the size {text!r}.", hint="Write it like 2GB, 500MB or 20KB.")
    unit = m.group(2).upper().rstrip("B")
    mult = {"": 1, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "KI": 2**10, "MI": 2**20, "GI": 2**30,
            "TI": 2**40}[unit]
    return int(float(m.group(1)) * mult)


class ShardWriter:
    """Write tensors into size-capped safetensors shards plus an index.

    Tensors are buffered until adding the next would pass ``max_shard_bytes``; then the shard is
    written. Shards are named ``model-0000i-of-0000n.safetensors`` at :meth:`close` (a single
    shard is named ``model.safetensors`` and gets no index), like ``save_pretrained``.
    """

    def __init__(self, out_dir: Path, max_shard_bytes: int, metadata: dict[str, str] | None = None):
        self.out_dir = Path(out_dir)
        self.max = max(1, int(max_shard_bytes))
        self.metadata = {"format": "pt", **(metadata or {})}
        self._buf: dict[str, torch.Tensor] = {}
        self._buf_bytes = 0
        self._written: list[tuple[Path, list[str], int]] = []

    def add(self, name: str, tensor: torch.Tensor) -> None:
        n = tensor.numel() * tensor.element_size()
        if self._buf and self._buf_bytes + n > self.max:
            self._flush()
        self._buf[name] = tensor.contiguous()
        self._buf_bytes += n

    def _flush(self) -> None:
        from safetensors.torch import save_file

        if not self._buf:
            return
        path = self.out_dir / f".shard-{len(self._written):05d}.safetensors"
        save_file(self._buf, str(path), metadata=self.metadata)
        self._written.append((path, list(self._buf), self._buf_bytes))
        self._buf, self._buf_bytes = {}, 0

    def close(self) -> list[Path]:
        """Write what is left, name the shards, write the index; returns the shard paths."""
        self._flush()
        n = len(self._written)
        final: list[Path] = []
        weight_map: dict[str, str] = {}
        total = 0
        for i, (path, names, nbytes) in enumerate(self._written):
            dest = self.out_dir / (SINGLE_NAME if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors")
            path.rename(dest)
            final.append(dest)
            total += nbytes
            weight_map.update({k: dest.name for k in names})
        if n > 1:
            (self.out_dir / INDEX_NAME).write_text(json.dumps(
                {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}, indent=2) + "\n")
        return final


def check_output_dir(out: Path, *, overwrite: bool = True) -> None:
    """Fail early when ``out`` may not be (re)placed by :func:`atomic_output_dir`.

    Semantics: a missing ``out`` is created; an empty directory is replaced; a directory that an
    earlier moeharden run wrote (it holds the ``.moeharden-output`` marker) is replaced when
    ``overwrite`` is true (the default: re-running a command refreshes its output); anything else —
    a file, or a non-empty directory moeharden did not write — is refused, so a mistyped ``--out``
    can never delete someone's data.

    Raises:
        InputError: ``out`` is a file, a foreign non-empty directory, or an earlier output while
            ``overwrite`` is false.
    """
    out = Path(out)
    if not out.exists():
        return
    if not out.is_dir():
        raise InputError(f"Output path {out} exists and is not a directory.", hint="Choose another --out.")
    if (out / OUTPUT_MARKER).is_file():
        if not overwrite:
            raise InputError(f"Output directory {out} already holds a moeharden output.",
                             hint="Remove it, choose another --out, or ask for overwriting.")
        return
    if any(out.iterdir()):
        raise InputError(f"Output directory {out} exists, is not empty and was not written by moeharden; "
                         "refusing to replace it.", hint="Choose a new or empty --out directory.")


@contextmanager
def atomic_output_dir(out: Path, *, overwrite: bool = True) -> Iterator[Path]:
    """Build an output directory in a temporary sibling, renamed into place at the end.

    Yields the temporary directory to fill. On success it gets the ``.moeharden-output`` marker and
    replaces ``out`` (see :func:`check_output_dir` for when an existing ``out`` may be replaced; it
    is checked both before and after the work). On any exception, Ctrl-C included, the temporary
    directory is removed and ``out`` is left exactly as it was.

    Raises:
        InputError: see :func:`check_output_dir`.
    """
    from moeharden import __version__

    out = Path(out)
    check_output_dir(out, overwrite=overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    # plain mkdir (not mkdtemp, whose 0700 mode would stick to the renamed output): umask decides
    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:12]}"
    tmp.mkdir()
    try:
        yield tmp
        (tmp / OUTPUT_MARKER).write_text(json.dumps({"tool": "moeharden", "version": __version__}) + "\n")
        check_output_dir(out, overwrite=overwrite)          # out may have appeared meanwhile
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        # swap via a second sibling so that a crash between the renames leaves a complete copy
        old = out.with_name(f".{out.name}.old-{uuid.uuid4().hex[:8]}")
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)
