"""The process's torch compute threads for one block of work (:func:`compute_threads`).

Work on tiny tensors (the demo model, a self-check's tiny model) runs as fast or faster on one
thread, and leaves the other cores to work beside it.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def compute_threads(n: int) -> Iterator[None]:
    """Run the block with ``n`` torch compute threads, then restore the previous count."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)
