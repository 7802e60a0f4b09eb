"""Manifest hashing: throughput ÷ `sha256sum` on the same files (goal ≥ 0.8), and the peak RSS of
`lock` ÷ the largest shard (goal ≤ 1.5; raw and above the import baseline), on a multi-shard
checkpoint (~350 MB fp32 Mixtral in ~40 MB shards; built in a child process).
Run: .venv/bin/python bench/lock.py [WORKDIR]
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time
from pathlib import Path

CHILD_HASH = """
import sys, time
from pathlib import Path
from moeharden.defend.manifest import tensor_sha256
from moeharden.io.shards import CheckpointFiles
files = CheckpointFiles(Path(sys.argv[1]))
t0 = time.perf_counter()
n = sum(1 for _ in tensor_sha256(files))
print(time.perf_counter() - t0)
"""
CHILD_LOCK = """
import resource, sys
from pathlib import Path
from moeharden.defend.lock import LockSettings, lock_checkpoint
lock_checkpoint(sys.argv[1], LockSettings(out=Path(sys.argv[4]), policy=Path(sys.argv[2]), key=Path(sys.argv[3])))
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""
CHILD_BASE = """
import resource
import moeharden.defend.lock, moeharden.defend.manifest, moeharden.defend.signing, model_signing.signing, torch, transformers
from transformers import MixtralForCausalLM
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""
POLICY = "version: 1\nlicense: mit\npermitted_uses: bench\ncontact: x@y\ngroups: {experts: frozen}\n"


def main() -> None:
    work = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(tempfile.mkdtemp(prefix="moeharden-bench-"))
    src = work / "src"
    if not src.exists():
        subprocess.run([sys.executable, str(Path(__file__).with_name("prune_stream.py")), "--build", str(work)],
                       check=True, capture_output=True)
    shards = sorted(src.glob("*.safetensors"))
    largest = max(p.stat().st_size for p in shards)
    total = sum(p.stat().st_size for p in shards)
    subprocess.run(["cat", *map(str, shards)], stdout=subprocess.DEVNULL, check=True)   # warm the page cache
    t0 = time.perf_counter()
    subprocess.run(["sha256sum", *map(str, shards)], stdout=subprocess.DEVNULL, check=True)
    t_sum = time.perf_counter() - t0
    out = subprocess.run([sys.executable, "-c", CHILD_HASH, str(src)], capture_output=True, text=True, check=True)
    t_ours = float(out.stdout.split()[-1])
    print(f"checkpoint: {total / 1e6:.0f} MB in {len(shards)} shards, largest {largest / 1e6:.1f} MB")
    print(f"hashing throughput ÷ sha256sum: {t_sum / t_ours:.2f} ({total / 1e6 / t_ours:.0f} MB/s vs "
          f"{total / 1e6 / t_sum:.0f} MB/s)  (goal ≥ 0.8)")
    (work / "policy.yaml").write_text(POLICY)
    keys = work / "keys"
    if not keys.exists():
        subprocess.run([sys.executable, "-m", "moeharden", "lock", "keygen", "--out", str(keys)], check=True,
                       capture_output=True)
    base_kb = int(subprocess.run([sys.executable, "-c", CHILD_BASE], capture_output=True, text=True).stdout.split()[-1])
    res = subprocess.run([sys.executable, "-c", CHILD_LOCK, str(src), str(work / "policy.yaml"),
                          str(keys / "moeharden.key"), str(work / "locked")], capture_output=True, text=True)
    if res.returncode:
        sys.exit(res.stderr[-2000:])
    peak_kb = int(res.stdout.split()[-1])
    print(f"lock peak RSS ÷ largest shard: raw {peak_kb * 1024 / largest:.2f}; above the import baseline "
          f"({base_kb / 1024:.0f} MB) {(peak_kb - base_kb) * 1024 / largest:.2f}  (goal ≤ 1.5)")


if __name__ == "__main__":
    main()
