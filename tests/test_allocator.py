"""io/allocator: freed activation blocks kept in glibc's heaps leave the process on release.

Each case runs in a fresh interpreter (the heaps are process-wide, and the test process's
allocator must stay as pytest found it). The figure compared is the kernel's own count of
resident pages (/proc/self/statm), not anything moeharden computes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc_trim (Linux)")

CHILD = """
import json, sys, torch
from moeharden.io.allocator import release_free_memory
def rss():
    return int(open("/proc/self/statm").read().split()[1]) * 4096 >> 20    # MiB resident
big = torch.empty(30 << 20, dtype=torch.uint8); big.fill_(1); del big   # glibc raises its threshold to 30 MiB
keep, blocks = [], []
base = rss()
for _ in range(40):                                  # 240 MiB of 6 MiB blocks, small live ones between
    b = torch.empty(6 << 20, dtype=torch.uint8); b.fill_(1); blocks.append(b)
    keep.append(torch.ones(1000))
peak = rss()
del blocks
kept = rss()
ok = release_free_memory() if sys.argv[1] == "1" else None
print(json.dumps({"ok": ok, "base": base, "peak": peak, "kept": kept, "after": rss()}))
"""


def _run(release: bool) -> dict:
    environ = {k: v for k, v in os.environ.items() if k != "MALLOC_MMAP_THRESHOLD_"}
    out = subprocess.run([sys.executable, "-c", CHILD, "1" if release else "0"], capture_output=True, text=True,
                         check=True, env=environ).stdout
    return json.loads(out)


def test_freed_heap_blocks_leave_the_process_on_release():
    got = _run(True)
    assert got["peak"] - got["base"] >= 200                # the blocks were resident
    assert got["kept"] - got["base"] >= 200                # glibc kept them in its heaps when freed
    assert got["ok"] is True
    assert got["after"] - got["base"] <= 24                # and the release handed them back


def test_without_the_release_glibc_keeps_them():
    """Why the module exists: glibc's default keeps the freed blocks (if this ever fails, a newer
    glibc returns them by itself and the release is no longer needed)."""
    got = _run(False)
    assert got["peak"] - got["base"] >= 200 and got["after"] - got["base"] >= 200


def test_the_attribution_pass_releases_after_every_forward(monkeypatch):
    """routing_stats hands the heaps' free pages back once per forward (each packed group)."""
    import torch
    from transformers import MixtralConfig, MixtralForCausalLM

    import moeharden.io.allocator as allocator
    from moeharden.attack.attribution import routing_stats, token_groups

    calls = []
    monkeypatch.setattr(allocator, "release_free_memory", lambda: calls.append(1) or True)
    cfg = MixtralConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                        num_attention_heads=2, num_key_value_heads=1, num_local_experts=4, num_experts_per_tok=2)
    torch.manual_seed(0)
    model = MixtralForCausalLM(cfg).eval()

    class Ids:
        def __call__(self, rows, **_):
            ids = [torch.tensor(r) for r in rows]
            n = max(len(x) for x in ids)
            x = torch.stack([torch.nn.functional.pad(t, (0, n - len(t))) for t in ids])
            return {"input_ids": x, "attention_mask": torch.stack([(torch.arange(n) < len(t)).long() for t in ids])}

    rows = [[1, 2, 3, 4]] * 5 + [[5, 6]] * 3
    routing_stats(model, Ids(), rows, [0], 4, batch_size=3, max_tokens=None)
    assert len(calls) == len(token_groups([len(r) for r in rows], 3, None)) == 3
