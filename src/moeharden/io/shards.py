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
from moeharden.io.byteio import copy_range

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
        if count > 1 << 64:        # no file holds it (and a number this long could not even be printed)
            raise CheckpointError(f"A tensor of dtype {dtype} with {len(shape)} dimensions this large cannot exist "
                                  "on disk (over 2**64 elements).")
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
    """Parse and fully validate a safetensors header without reading tensor data.

    The checks are the format's own rules, so a file that passes loads anywhere: a regular file
    (never a FIFO or device, which would block or never end), a JSON object header of sane size
    and nesting, every entry with a known dtype, an integer shape and ``data_offsets``, a byte size
    equal to ``prod(shape) x dtype size``, and the data ranges, sorted by start, tiling the data
    buffer exactly: starting at 0, contiguous (no overlap, no hole) and ending at the file's end.

    Returns:
        (header dict, absolute offset where tensor data begins).
    Raises:
        CheckpointError: not a regular file, truncated file, oversized or malformed header, a size
            that disagrees with its shape, overlapping or non-contiguous ranges, data beyond the end.
    """
    from moeharden.io.files import json_depth_ok, open_regular

    with open_regular(path, what="weight file", error=CheckpointError) as f:
        size = os.fstat(f.fileno()).st_size
        raw = f.read(8)
        if len(raw) < 8:
            raise CheckpointError(f"{path.name} is truncated (only {size} bytes): not a safetensors file.")
        (n,) = struct.unpack("<Q", raw)
        if n <= 0 or 8 + n > size or n > 100_000_000:
            raise CheckpointError(f"{path.name} has a corrupt or truncated header (declares {n} bytes, file has {size}).",
                                  hint="Re-download or re-save the checkpoint.")
        text = f.read(n)
    try:
        decoded = text.decode("utf-8")
        header = json.loads(decoded) if json_depth_ok(decoded) else None
    except (ValueError, RecursionError):      # JSONDecodeError, UnicodeDecodeError, an int past 4300 digits
        raise CheckpointError(f"{path.name} has an unreadable safetensors header.") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path.name} has a malformed safetensors header.")
    meta_block = header.get("__metadata__")
    if meta_block is not None and not (isinstance(meta_block, dict)
                                       and all(isinstance(v, str) for v in meta_block.values())):
        raise CheckpointError(f"{path.name}: its __metadata__ must map names to strings.")
    base = 8 + n
    ranges = []
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        try:
            if not isinstance(meta, dict):
                raise TypeError
            offs, shape = meta["data_offsets"], meta["shape"]
            if (not isinstance(offs, list) or len(offs) != 2 or not isinstance(shape, list)
                    or not all(type(v) is int and v >= 0 for v in [*offs, *shape])
                    or not isinstance(meta["dtype"], str)):
                raise TypeError
            start, end = offs
            nbytes = dtype_nbytes(meta["dtype"], shape)
        except CheckpointError as err:
            raise CheckpointError(f"{path.name}: tensor {name!r}: {err.message}") from None
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{path.name}: tensor {name!r} has a malformed header entry (dtype, integer "
                                  "shape and two non-negative integer data_offsets are required).") from None
        if end - start != nbytes:
            raise CheckpointError(f"{path.name}: the size of tensor {name!r} ({end - start} bytes) disagrees with "
                                  f"its shape {str(shape)[:80]} and dtype {meta['dtype']} ({nbytes} bytes).",
                                  hint="The file is corrupt or was edited; re-download or re-save it.")
        ranges.append((start, end, name))
    pos, prev = 0, None
    for start, end, name in sorted(ranges):
        if start < pos:
            raise CheckpointError(f"{path.name}: tensors {prev!r} and {name!r} overlap (share bytes).",
                                  hint="Do not trust this checkpoint; re-download or re-save it.")
        if start > pos:
            raise CheckpointError(f"{path.name}: a gap of {start - pos} bytes lies before tensor {name!r}; "
                                  "tensor data must be contiguous.", hint="Re-download or re-save the checkpoint.")
        pos, prev = end, name
    if base + pos != size:
        what = "lies beyond the end of the file" if base + pos > size else "is followed by stray bytes"
        raise CheckpointError(f"{path.name} is truncated or corrupt: its tensor data {what} "
                              f"(header describes {base + pos} bytes, file has {size}).",
                              hint="Re-download or re-save the checkpoint.")
    return header, base


def _inside(path: Path, roots: list[Path]) -> bool:
    real = path.resolve()
    return any(real.is_relative_to(r) for r in roots)


class CheckpointFiles:
    """Index of a local safetensors checkpoint: one ``model.safetensors`` or shards with an index.

    Every shard must resolve inside the checkpoint directory (or, for a Hub cache snapshot, its
    ``blobs`` folder) and be a regular file; the index must name plain file names beside it, and
    agree with the shards' headers (each tensor in exactly one shard, where the index says).

    Raises:
        CheckpointError: no safetensors files, a malformed index, an index naming missing shards or
            paths outside the checkpoint, a shard that is a link out or not a regular file, a tensor
            in two shards or not where the index says, a corrupt header.
    """

    def __init__(self, root: Path):
        from moeharden.io.files import read_json_object
        from moeharden.io.sidefiles import allowed_roots

        self.root = Path(root)
        roots = allowed_roots(self.root)
        index = self.root / INDEX_NAME
        weight_map: dict | None = None
        if index.exists() or index.is_symlink():
            if not _inside(index, roots):
                raise CheckpointError(f"{index} is a link to a file outside the checkpoint directory.",
                                      hint="Do not trust this checkpoint.")
            raw = read_json_object(index, what="safetensors index", error=CheckpointError)
            weight_map = raw.get("weight_map")
            if not isinstance(weight_map, dict):
                raise CheckpointError(f"{index} is not a valid safetensors index (no \"weight_map\" object).")
            values = list(weight_map.values())
            if not all(isinstance(n, str) for n in values):
                raise CheckpointError(f"{index} is not a valid safetensors index (its weight_map values must be "
                                      "shard file names).")
            # a shard is a plain file name beside the index: a path would read outside the checkpoint
            bad = sorted(repr(n) for n in values if Path(n).name != n
                         or n in ("", ".", "..") or "\\" in n or "\x00" in n)
            if bad:
                raise CheckpointError(f"{index} names shard(s) outside the checkpoint directory: "
                                      f"{', '.join(bad[:5])}.", hint="Do not trust this checkpoint.")
            # a shard named like a file moeharden writes beside the weights (model.sig, the manifest,
            # config.json, the output marker) would be overwritten by it, or overwrite it
            odd = sorted(repr(n) for n in values if not n.endswith(".safetensors"))
            if odd:
                raise CheckpointError(f"{index} names shard(s) that are not .safetensors files: {', '.join(odd[:5])}.",
                                      hint="Do not trust this checkpoint.")
            names = set(values)
            missing = sorted(n for n in names if not (self.root / n).exists())
            if missing:
                raise CheckpointError(f"The index names shard(s) that are missing: {', '.join(missing)}.",
                                      hint="The download is incomplete; fetch the missing files.")
            self.shards = [self.root / n for n in sorted(names)]
        else:
            self.shards = sorted(self.root.glob("*.safetensors"))
        if not self.shards:
            raise CheckpointError(f"No safetensors weights in {self.root}.")
        outside = [s.name for s in self.shards if not _inside(s, roots)]
        if outside:
            raise CheckpointError(f"Weight file(s) {', '.join(outside[:5])} of {self.root} are links to files "
                                  "outside the checkpoint directory; refusing to read them.",
                                  hint="Do not trust this checkpoint, or copy the real files in.")
        self.tensors: dict[str, TensorInfo] = {}
        self.metadata: dict[str, dict] = {}
        for shard in self.shards:
            header, base = read_header(shard)
            self.metadata[shard.name] = header.get("__metadata__", {}) or {}
            for name, meta in header.items():
                if name == "__metadata__":
                    continue
                if name in self.tensors:
                    raise CheckpointError(f"Tensor {name!r} is stored twice: in {self.tensors[name].file.name} "
                                          f"and in {shard.name}.", hint="Do not trust this checkpoint.")
                if weight_map is not None and weight_map.get(name) != shard.name:
                    raise CheckpointError(f"Tensor {name!r} lies in {shard.name}, but the index says "
                                          f"{weight_map.get(name)!r}.", hint="The index and the shards disagree.")
                s, e = meta["data_offsets"]
                self.tensors[name] = TensorInfo(name, shard, meta["dtype"], tuple(meta["shape"]), base + s, base + e)
        if weight_map is not None:
            absent = sorted(set(weight_map) - set(self.tensors))
            if absent:
                raise CheckpointError(f"The index names tensor(s) no shard holds: {', '.join(map(repr, absent[:5]))}.",
                                      hint="The index and the shards disagree.")


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
    return _read_range(info, info.start, info.end - info.start, list(info.shape), handle)


def _read_range(info: TensorInfo, start: int, length: int, shape: list[int], handle=None) -> torch.Tensor:
    """``length`` bytes of ``info.file`` from ``start`` as a tensor of ``shape`` (read into one buffer)."""
    own = handle is None
    f = open(info.file, "rb") if own else handle
    buf = bytearray(length)                       # read straight into it: never a second copy
    try:
        f.seek(start)
        got = f.readinto(buf) if length else 0
    finally:
        if own:
            f.close()
    if got != length:
        raise CheckpointError(f"{info.file.name} ends inside tensor {info.name!r}: it changed or was truncated "
                              "after it was indexed.", hint="Re-download or re-save the checkpoint.")
    dtype = _TORCH_DTYPES[info.dtype]
    if not buf:
        return torch.empty(shape, dtype=dtype)
    return torch.frombuffer(buf, dtype=dtype).reshape(shape)


def torch_dtype(dtype: str) -> torch.dtype | None:
    """The torch dtype of a safetensors dtype, or ``None`` where this torch has none (sub-byte ones)."""
    return _TORCH_DTYPES.get(dtype)


def contiguous_rows(info: TensorInfo, axis: int) -> bool:
    """Whether every slice along ``axis`` is one contiguous byte range (all dimensions before it are 1)."""
    return all(d == 1 for d in info.shape[:axis])


def read_rows(info: TensorInfo, axis: int, start: int, count: int, handle=None) -> torch.Tensor:
    """Rows ``start .. start + count`` along ``axis`` of one tensor (e.g. one expert of a fused one):
    only their bytes when they are contiguous (a real fused ``[E, 2I, H]`` tensor is a gigabyte),
    else the whole tensor, narrowed."""
    if info.dtype in _TORCH_DTYPES and contiguous_rows(info, axis):
        row = (info.end - info.start) // max(info.shape[axis], 1)
        shape = list(info.shape)
        shape[axis] = count
        return _read_range(info, info.start + start * row, count * row, shape, handle)
    return read_tensor(info, handle).narrow(axis, start, count)


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
