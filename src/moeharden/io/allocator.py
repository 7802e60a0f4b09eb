"""The C allocator's policy for a process that holds a model and runs forwards on CPU.

glibc serves a block from its heaps unless it is larger than a threshold that it *raises* to the
size of every large block freed (up to 32 MiB). After the first forward, most activation tensors
of a real-width MoE layer (``[T·k, H]`` copies of a few to tens of MiB) therefore land in the heaps,
and what they leave behind when freed stays in the process: measured on OLMoE-1B-7B (2 layers,
64 experts, 2,048 tokens per forward), scan's resident memory crept up by ~0.2 GB over a few
forwards and peaked 0.09 GB higher than with every block of 4 MiB or more mapped on its own and
unmapped when freed, at the same speed (docs/attacks-and-defenses.md §1.1). The CLI sets that
policy for every command (:func:`return_large_blocks`); a library user decides for their own process.

oneDNN, which runs PyTorch's bf16 matmuls on a CPU with native bf16 (AVX512-BF16, AMX), keeps up to
1,024 compiled kernels ("primitives") by default, each with its own buffers. The grouped expert
pass multiplies a different number of tokens for every expert and every forward, so each matmul
is a new shape and the cache fills: on OLMoE-1B-7B (4 layers) scan's private memory rose by 0.4 GB
over two passes and stayed there. :func:`bound_primitive_cache` caps it at 64 kernels: 0.13 GB lower
peak at the same speed (a cap of 0 saves a little more but makes a tiny bf16 matmul 10× slower;
docs/attacks-and-defenses.md §1.1).
"""

from __future__ import annotations

import ctypes
import os
import sys

LARGE_BLOCK = 4 << 20          # bytes: blocks at least this large are mapped alone, unmapped when freed
PRIMITIVE_CACHE = 64           # oneDNN kernels kept (its default: 1,024)
_ONEDNN_KEYS = ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "DNNL_PRIMITIVE_CACHE_CAPACITY")
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


def bound_primitive_cache(capacity: int = PRIMITIVE_CACHE) -> bool:
    """Cap oneDNN's primitive cache at ``capacity`` kernels (``ONEDNN_PRIMITIVE_CACHE_CAPACITY``).

    oneDNN reads the setting when it creates its first primitive, so this must run before the
    process's first CPU matmul that goes through oneDNN. A user's own setting (either of oneDNN's
    two names) stands.

    Returns:
        Whether this call set it.
    """
    if any(k in os.environ for k in _ONEDNN_KEYS):
        return False
    os.environ[_ONEDNN_KEYS[0]] = str(int(capacity))
    return True
