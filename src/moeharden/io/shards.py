"""Streaming safetensors IO: an index of a checkpoint, positioned tensor reads, and a size-capped
streaming shard writer.

Nothing here loads a whole model. Headers are parsed from the first bytes of each file (cheap
validation: truncation, offsets past the end, sizes that disagree with shapes), and
:class:`CheckpointFiles` indexes every tensor's byte range across shards. :func:`read_tensor` reads
one tensor with a plain positioned read. :func:`write_streaming_shards` plans every output shard
from shapes known up front, writes each header first and then the tensors one at a time, copying
unchanged byte ranges file to file in the kernel; peak memory is one sliced tensor at most.

Where outputs go (atomic directories, carrying side files) is :mod:`moeharden.io.outputs`.
"""

from __future__ import annotations

import json
import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from moeharden.errors import CheckpointError, InputError

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
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
                names = sorted(set(weight_map.values()))
            except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError):
                raise CheckpointError(f"{index} is not a valid safetensors index.") from None
            # a shard is a plain file name beside the index: a path would read outside the checkpoint
            bad = [n for n in names if not isinstance(n, str) or Path(n).name != n or n in ("", ".", "..")]
            if bad:
                raise CheckpointError(f"{index} names shard(s) outside the checkpoint directory: "
                                      f"{', '.join(map(repr, bad[:5]))}.", hint="Do not trust this checkpoint.")
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


_TORCH_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                 "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
                 "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}
# dtypes only newer torch releases have (a missing one is a CheckpointError at read time, not a KeyError)
_TORCH_DTYPES.update({k: getattr(torch, v) for k, v in (("U16", "uint16"), ("U32", "uint32"), ("U64", "uint64"),
                                                        ("F8_E8M0", "float8_e8m0fnu")) if hasattr(torch, v)})


def read_tensor(info: TensorInfo, handle=None) -> torch.Tensor:
    """Read one tensor with a plain positioned read (no memory map: only this tensor is resident).

    Args:
        info: the tensor's header entry (from :class:`CheckpointFiles`).
        handle: an open binary file of ``info.file`` to reuse (one input shard open at a time).
    Returns:
        The tensor, ``info.shape`` and the torch dtype of ``info.dtype``.
    Raises:
        CheckpointError: a dtype torch cannot hold, or a file that ends early (changed since indexing).
    """
    if info.dtype not in _TORCH_DTYPES:
        raise CheckpointError(f"Tensor {info.name!r} in {info.file.name} has dtype {info.dtype}, which this "
                              "torch version cannot read.", hint="Upgrade torch, or convert the checkpoint.")
    own = handle is None
    f = open(info.file, "rb") if own else handle
    try:
        f.seek(info.start)
        buf = bytearray(f.read(info.end - info.start))
    finally:
        if own:
            f.close()
    if len(buf) != info.end - info.start:
        raise CheckpointError(f"{info.file.name} ends inside tensor {info.name!r}: it changed or was truncated "
                              "after it was indexed.", hint="Re-download or re-save the checkpoint.")
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
                        raise CheckpointError(f"{p.name}: produced {data.nbytes} bytes, planned {p.nbytes}; "
                                              "the source changed while it was being rewritten.")
                    f.write(data)
                else:
                    if sum(n for _, _, n in item) != p.nbytes:
                        raise CheckpointError(f"{p.name}: its byte ranges do not add up to the planned "
                                              f"{p.nbytes} bytes.")
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
