"""Streaming prune: peak RSS ÷ the largest shard, and prune time ÷ a plain copy of the same files.

Builds a ~350 MB fp32 Mixtral checkpoint in ~40 MB shards, then runs `moeharden prune` (keeping 4
of 8 experts) in a child process and reads the child's peak RSS. The interpreter + torch baseline
(a child that imports the same modules and exits) is measured the same way and reported, with the
ratio both raw and baseline-corrected. Goals: RSS ratio ≤ 1.5, time ratio ≤ 2.
Run: .venv/bin/python bench/prune_stream.py [WORKDIR]
"""

from __future__ import annotations

import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPEATS = 3
CHILD_PRUNE = """
import sys, json, resource, time
from pathlib import Path
from moeharden.model.checkpoint import load_config
from moeharden.attack.prune import prune_checkpoint
keep = json.loads(sys.argv[3])
load_config(Path(sys.argv[1]))          # warm transformers' lazy config imports (start-up, not pruning)
t0 = time.perf_counter()
prune_checkpoint(Path(sys.argv[1]), Path(sys.argv[2]), {int(k): v for k, v in keep.items()}, max_shard_size="40MB")
print(time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""
CHILD_BASE = """
import sys, resource
from pathlib import Path
from moeharden.model.checkpoint import load_config
import moeharden.attack.prune, safetensors.torch, torch, transformers  # same imports and warm-up, no pruning
load_config(Path(sys.argv[1]))
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def build(root: Path) -> Path:
    import torch
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(0)
    cfg = MixtralConfig(vocab_size=8000, hidden_size=512, intermediate_size=1536, num_hidden_layers=4,
                        num_attention_heads=8, num_key_value_heads=4, num_local_experts=8, num_experts_per_tok=2)
    path = root / "src"
    MixtralForCausalLM(cfg).save_pretrained(path, max_shard_size="40MB")
    return path


def main() -> None:
    work = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(tempfile.mkdtemp(prefix="moeharden-bench-"))
    # build in a child: on Linux a child's ru_maxrss counts the parent image it was forked from
    subprocess.run([sys.executable, __file__, "--build", str(work)], check=True, capture_output=True)
    src = work / "src"
    shards = sorted(src.glob("*.safetensors"))
    largest = max(p.stat().st_size for p in shards)
    total = sum(p.stat().st_size for p in shards)
    keep = json.dumps({str(i): [0, 2, 4, 6] for i in range(4)})

    base_kb = int(subprocess.run([sys.executable, "-c", CHILD_BASE, str(src)], capture_output=True, text=True,
                                 check=True).stdout.split()[-1])
    # alternate copy and prune REPEATS times into fresh directories; medians damp the noise of a
    # shared machine (both are mostly kernel I/O against a warm page cache)
    t_copies, t_prunes, t_totals, peaks = [], [], [], []
    for r in range(REPEATS):
        dst = work / f"copy-{r}"
        dst.mkdir()
        t0 = time.perf_counter()
        for p in src.iterdir():
            shutil.copyfile(p, dst / p.name)
        t_copies.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        out = subprocess.run([sys.executable, "-c", CHILD_PRUNE, str(src), str(work / f"pruned-{r}"), keep],
                             capture_output=True, text=True, check=True)
        t_totals.append(time.perf_counter() - t0)     # the child process: start-up, imports, prune
        t, kb = out.stdout.split()[-2:]
        t_prunes.append(float(t))
        peaks.append(int(kb))
        shutil.rmtree(dst)
        shutil.rmtree(work / f"pruned-{r}")
    t_copy, t_prune, t_total = (statistics.median(x) for x in (t_copies, t_prunes, t_totals))
    peak_kb = max(peaks)
    print(f"checkpoint: {total / 1e6:.0f} MB in {len(shards)} shards, largest {largest / 1e6:.1f} MB")
    print(f"peak RSS ÷ largest shard: raw {peak_kb * 1024 / largest:.2f}; "
          f"above the import baseline ({base_kb / 1024:.0f} MB) {(peak_kb - base_kb) * 1024 / largest:.2f}  (goal ≤ 1.5)")
    print(f"prune time ÷ plain copy: {t_prune / t_copy:.2f} (medians of {REPEATS}: prune {t_prune:.2f} s, "
          f"copy {t_copy:.2f} s)  (goal ≤ 2); "
          f"the whole child process (start-up, imports, prune) took {t_total:.2f} s")


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--build":
        build(Path(sys.argv[2]))
    else:
        main()
