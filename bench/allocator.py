"""Scan's attribution pass under each allocator policy: time and memory (docs §1.1, stop 30).

The CLI once mapped every heap block of 4 MiB or more on its own (glibc's ``M_MMAP_THRESHOLD``) and
capped oneDNN's kernel cache at 64; now scan's pass hands the heaps' free pages back after every
forward (``io/allocator.release_free_memory``) and oneDNN keeps its default cache (1,024 kernels).
This bench runs the pass, in a fresh child process per policy, on one checkpoint: by default OLMoE-1B-7B's
real config truncated to 2 layers (64 experts, bf16, built here like ``bench/scale.py``'s and
deleted after), or a checkpoint you name. Every pass reads new token ids (64 prompts × 128
tokens; scan's token budget), as a scan meets new prompts.

Printed per policy: the median pass time (passes 2 to N; the first compiles the most), the peak
private memory (RssAnon, sampled every 2 ms) above the load, and what is left after the passes.
The ratios to read: pass time ÷ the current policy's, and the memory it costs. On a CPU without
native bf16 oneDNN does not run the bf16 matmuls and the cache changes nothing.

Run: .venv/bin/python bench/allocator.py [CHECKPOINT] [--passes 5] [--caches 64 256 512 1024]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = """
import json, statistics, sys, threading, time
import torch
from pathlib import Path
from moeharden.attack.attribution import routing_stats
from moeharden.model.checkpoint import load_model
from moeharden.model.registry import moe_layers
torch.set_num_threads(2)
passes = int(sys.argv[2])
model = load_model(Path(sys.argv[1]), dtype=torch.bfloat16)
info = moe_layers(model)
layers, E, V = [li.layer for li in info], info[0].num_experts, model.config.vocab_size

def anon():
    for line in open("/proc/self/status"):
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) / 2**20

load, peak = anon(), [0.0]

def sample():
    while True:
        peak[0] = max(peak[0], anon())
        time.sleep(0.002)

threading.Thread(target=sample, daemon=True).start()

class Ids:   # the calibration "texts" are token-id rows; this plays the tokenizer's part
    def __call__(self, rows, **_):
        x = torch.stack(list(rows))
        return {"input_ids": x, "attention_mask": torch.ones_like(x)}

ts = []
for r in range(passes):
    x = torch.randint(3, min(V, 30000), (64, 128), generator=torch.Generator().manual_seed(100 + r))
    t0 = time.perf_counter()
    routing_stats(model, Ids(), list(x), layers, E, batch_size=32)
    ts.append(time.perf_counter() - t0)
time.sleep(0.05)
print(json.dumps({"pass_s": statistics.median(ts[1:] or ts), "passes": ts, "load": load,
                  "peak_above": peak[0] - load, "after": anon()}))
"""


def _run(ckpt: Path, passes: int, env: dict[str, str]) -> dict:
    base = {k: v for k, v in os.environ.items()
            if k not in ("MALLOC_MMAP_THRESHOLD_", "ONEDNN_PRIMITIVE_CACHE_CAPACITY", "DNNL_PRIMITIVE_CACHE_CAPACITY")}
    out = subprocess.run([sys.executable, "-c", CHILD, str(ckpt), str(passes)], capture_output=True, text=True,
                         check=True, env=base | env).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoint", nargs="?", help="a local checkpoint (default: OLMoE-1B-7B's config, 2 layers)")
    ap.add_argument("--passes", type=int, default=5)
    ap.add_argument("--caches", type=int, nargs="+", default=[64, 256, 512, 1024])
    args = ap.parse_args()
    tmp = None
    ckpt = Path(args.checkpoint) if args.checkpoint else None
    if ckpt is None:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        import scale  # noqa: PLC0415  (the real-shape builder of bench/scale.py)

        tmp = Path(tempfile.mkdtemp(prefix="moeharden-bench-allocator-"))
        ckpt = tmp / "olmoe-L2E64"
        cls, kw = scale._config("olmoe-1b-7b", 2, None)
        scale._py(scale.CHILD_BUILD, cls, json.dumps(kw), ckpt, scale.SHARD)
    policies = [("blocks >= 4 MiB mapped alone (the old CLI)", {"MALLOC_MMAP_THRESHOLD_": str(4 << 20)}, 64)]
    policies += [("free pages released after each forward" + (" (now)" if c == 1024 else ""), {}, c)
                 for c in args.caches]
    try:
        rows = []
        for label, env, cache in policies:
            got = _run(ckpt, args.passes, env | {"ONEDNN_PRIMITIVE_CACHE_CAPACITY": str(cache)})
            rows.append((label, cache, got))
            print(f"measured: {label}, {cache} kernels: {got['pass_s']:.2f} s", flush=True)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    now = next((g for label, _, g in rows if label.endswith("(now)")), rows[-1][2])   # the CLI's policy today
    print(f"\ncheckpoint: {ckpt.name}; load {rows[0][2]['load']:.2f} GiB private; {args.passes} passes, new ids each\n")
    print("| heap policy | oneDNN kernels | pass s (median of 2..N) | ÷ now | peak above load GiB | after GiB |")
    print("|---|---|---|---|---|---|")
    for label, cache, g in rows:
        print(f"| {label} | {cache} | {g['pass_s']:.2f} | {g['pass_s'] / now['pass_s']:.2f} | "
              f"{g['peak_above']:.2f} | {g['after']:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
