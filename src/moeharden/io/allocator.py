"""Handing freed activation memory back to the system after a forward on CPU.

glibc serves a block from its heaps unless it is larger than a threshold that it *raises* to the
size of every large block freed (up to 32 MiB). After the first forward, most activation tensors
of a real-width MoE layer (``[T·k, H]`` copies of a few to tens of MiB) therefore live in the heaps,
and what they leave behind when freed stays in the process. :func:`release_free_memory` returns
those free pages (glibc's ``malloc_trim``); scan's attribution pass calls it after every forward.

Earlier versions instead mapped every block of 4 MiB or more on its own for the whole process
(``M_MMAP_THRESHOLD``) and capped oneDNN's kernel cache at 64. On a CPU with native bf16 both cost
more than they saved (docs/attacks-and-defenses.md §1.1, stop 30): mapping each block anew costs
page faults on every large allocation, and the expert pass multiplies a different number of tokens
per expert, so a 64-kernel cache recompiles its bf16 kernels in every forward. On OLMoE-1B-7B
(2 layers, 64 experts) the pass took 9.10 s with both against 3.93 s with a trim after each
forward and oneDNN's default cache (1,024 kernels), which holds about 0.5 GiB more. A user short of
memory may still set ``ONEDNN_PRIMITIVE_CACHE_CAPACITY`` (and glibc's ``MALLOC_MMAP_THRESHOLD_``)
themselves.
"""

from __future__ import annotations

import ctypes
import sys


def release_free_memory() -> bool:
    """Return the C heaps' free pages to the system (glibc's ``malloc_trim(0)``, every arena).

    A no-op where the C library is not glibc. Cheap (milliseconds): it walks the free lists only.

    Returns:
        Whether memory was returned (glibc's own answer; False where it is not available).
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        trim = ctypes.CDLL(None).malloc_trim      # the process's own C library
    except (OSError, AttributeError):
        return False
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return trim(0) == 1
