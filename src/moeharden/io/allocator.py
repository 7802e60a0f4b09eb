"""The C allocator's policy for a process that holds a model and runs forwards on CPU.

glibc serves a block from its heaps unless it is larger than a threshold that it *raises* to the
size of every large block freed (up to 32 MiB). After the first forward, most activation tensors
of a real-width MoE layer (``[T·k, H]`` copies of a few to tens of MiB) therefore land in the heaps,
and what they leave behind when freed stays in the process: measured on OLMoE-1B-7B (2 layers,
64 experts, 2,048 tokens per forward), scan's resident memory crept up by ~0.2 GB over a few
forwards and peaked 0.09 GB higher than with every block of 4 MiB or more mapped on its own and
unmapped when freed, at the same speed (docs/attacks-and-defenses.md §1.1). The CLI sets that
policy for every command (:func:`return_large_blocks`); a library user decides for their own process.
"""

from __future__ import annotations

import ctypes
import os
import sys

LARGE_BLOCK = 4 << 20          # bytes: blocks at least this large are mapped alone, unmapped when freed
_M_MMAP_THRESHOLD = -3         # glibc's mallopt parameter number (malloc.h)


def return_large_blocks(threshold: int = LARGE_BLOCK) -> bool:
    """Ask glibc to map every block of ``threshold`` bytes or more on its own, so freeing it returns
    the memory to the system at once (and stop it raising that threshold as blocks are freed).

    A no-op where the C library is not glibc, and where the user chose a threshold with glibc's own
    ``MALLOC_MMAP_THRESHOLD_`` environment variable (theirs stands).

    Returns:
        Whether the policy is now set.
    """
    if not sys.platform.startswith("linux") or "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt     # the process's own C library
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return mallopt(_M_MMAP_THRESHOLD, int(threshold)) == 1
