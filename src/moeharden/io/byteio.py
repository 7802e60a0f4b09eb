"""Moving bytes without holding them: a file range into a tensor's memory, or into another file.

Both are positioned system calls (``preadv``, ``copy_file_range``), so a checkpoint's tensors pass
through no intermediate buffer and no memory map.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from moeharden.errors import CheckpointError


def read_into(info: Any, start: int, out: torch.Tensor, handle) -> None:
    """Fill the contiguous tensor ``out`` with the file bytes of ``info.file`` from absolute offset
    ``start`` (a positioned read straight into its memory: no intermediate copy, no memory map).
    ``info`` is the tensor's :class:`~moeharden.io.shards.TensorInfo` (its file, name and byte
    range; not imported here, since shards imports this module).

    Raises:
        CheckpointError: the bytes would run past the tensor's range, or the file ends early.
    """
    length = out.numel() * out.element_size()
    if start < info.start or start + length > info.end:
        raise CheckpointError(f"A read of {length} bytes at {start} leaves tensor {info.name!r} in "
                              f"{info.file.name}.", hint="Do not trust this checkpoint.")
    if not length:
        return
    view = memoryview(out.view(torch.uint8).reshape(-1).numpy())
    done = 0
    while done < length:
        got = os.preadv(handle.fileno(), [view[done:]], start + done)
        if got <= 0:
            raise CheckpointError(f"{info.file.name} ends inside tensor {info.name!r}: it changed or was "
                                  "truncated after it was indexed.", hint="Re-download or re-save the checkpoint.")
        done += got


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
