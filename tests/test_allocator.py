"""io/allocator: with the policy set, freed large blocks leave the process at once.

Each case runs in a fresh interpreter (the policy is process-wide, and the test process's
allocator must stay as pytest found it). The figure compared is the kernel's own count of
resident pages (/proc/self/statm), not anything moeharden computes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt (Linux)")

CHILD = """
import json, sys, torch
from moeharden.io.allocator import return_large_blocks
def rss():
    return int(open("/proc/self/statm").read().split()[1]) * 4096 >> 20    # MiB resident
ok = return_large_blocks() if sys.argv[1] == "1" else False
big = torch.empty(30 << 20, dtype=torch.uint8); big.fill_(1); del big   # glibc raises its threshold to 30 MiB
keep, blocks = [], []
base = rss()
for _ in range(40):                                  # 240 MiB of 6 MiB blocks, small live ones between
    b = torch.empty(6 << 20, dtype=torch.uint8); b.fill_(1); blocks.append(b)
    keep.append(torch.ones(1000))
peak = rss()
del blocks
print(json.dumps({"ok": ok, "base": base, "peak": peak, "after": rss()}))
"""


def _run(policy: bool, **env) -> dict:
    environ = {k: v for k, v in os.environ.items() if k != "MALLOC_MMAP_THRESHOLD_"} | env
    out = subprocess.run([sys.executable, "-c", CHILD, "1" if policy else "0"], capture_output=True, text=True,
                         check=True, env=environ).stdout
    return json.loads(out)


def test_freed_large_blocks_return_to_the_system_with_the_policy():
    got = _run(True)
    assert got["ok"] is True
    assert got["peak"] - got["base"] >= 200                # the blocks were resident
    assert got["after"] - got["base"] <= 24                # and left with their tensors


def test_without_the_policy_glibc_keeps_them():
    """Why the module exists: glibc's default keeps the freed blocks (if this ever fails, a newer
    glibc returns them by itself and the policy is no longer needed)."""
    got = _run(False)
    assert got["peak"] - got["base"] >= 200 and got["after"] - got["base"] >= 200


def test_a_users_own_threshold_stands():
    got = _run(True, MALLOC_MMAP_THRESHOLD_=str(64 << 20))    # theirs: 64 MiB, so the 6 MiB blocks stay
    assert got["ok"] is False
    assert got["after"] - got["base"] >= 200


ONEDNN_CHILD = """
import json, sys
from moeharden.io.allocator import bound_primitive_cache, return_large_blocks
return_large_blocks()
ok = bound_primitive_cache() if sys.argv[1] == "1" else False
import os, torch
torch.set_num_threads(1)
def rss():
    return int(open("/proc/self/statm").read().split()[1]) * 4096 >> 20
w = torch.randn(1024, 1024, dtype=torch.bfloat16)
x = torch.randn(1200, 1024, dtype=torch.bfloat16)
torch.nn.functional.linear(x[:1], w)
base = rss()
for m in range(3, 1200, 3):                          # a new token count every time, as the expert pass has
    torch.nn.functional.linear(x[:m], w)
print(json.dumps({"ok": ok, "env": os.environ.get("ONEDNN_PRIMITIVE_CACHE_CAPACITY"), "grown": rss() - base}))
"""


def _onednn(policy: bool, **env) -> dict:
    environ = {k: v for k, v in os.environ.items() if "PRIMITIVE_CACHE_CAPACITY" not in k} | env
    out = subprocess.run([sys.executable, "-c", ONEDNN_CHILD, "1" if policy else "0"], capture_output=True,
                         text=True, check=True, env=environ).stdout
    return json.loads(out)


def _native_bf16() -> bool:
    import torch

    flags = open("/proc/cpuinfo").read() if os.path.exists("/proc/cpuinfo") else ""
    return torch.backends.mkldnn.is_available() and ("avx512_bf16" in flags or "amx_bf16" in flags)


def test_the_primitive_cache_cap_is_set_and_a_users_own_stands():
    got = _onednn(True)
    assert got["ok"] is True and got["env"] == "64"
    theirs = _onednn(True, ONEDNN_PRIMITIVE_CACHE_CAPACITY="512")
    assert theirs["ok"] is False and theirs["env"] == "512"
    assert _onednn(True, DNNL_PRIMITIVE_CACHE_CAPACITY="8")["ok"] is False


@pytest.mark.skipif(not _native_bf16(), reason="oneDNN runs bf16 matmuls only on a CPU with native bf16")
def test_with_the_cap_bf16_kernels_of_new_shapes_do_not_pile_up():
    """400 bf16 matmuls, each with a new row count: oneDNN's default cache keeps a kernel (and its
    buffers) for each; capped at 64 the process keeps less (the kernel's own resident pages)."""
    capped, default = _onednn(True), _onednn(False)
    assert default["env"] is None and capped["env"] == "64"
    assert capped["grown"] <= default["grown"] - 32, (capped, default)      # measured: 201 against 271 MiB
