"""Self-check cost: its share of `moeharden prune` and `moeharden lock` on the demo model.

Builds (or reuses from the cache) the demo checkpoint, then times, in fresh child processes,
`moeharden prune DEMO --experts-from KEEP --out X` and `moeharden lock DEMO --policy P --key K
--out X` with and without `--skip-self-check`: with the self-check's disk cache emptied before every
run (cold: the check really runs, importing the family's modeling code and building, pruning and
reloading a tiny model), and with it warm (a repeated command in an unchanged environment). The
ratio printed is (with - without) / with: the fraction of the command's wall time the self-check
costs (goal ≤ 0.10). Cold, the check runs in a forked child process beside the command
(model/adapter_check.py), so what it costs is what does not overlap on the machine's cores. The
self-check alone (in a child, cold) is reported too, and its cost on a few other families.
(`entangle` is not timed: on the demo it trains for minutes, against seconds for a cold check.)
Run: .venv/bin/python bench/selfcheck.py [WORKDIR]
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPEATS = 3
CHILD_SELFCHECK = """
import sys, time
from transformers.models.auto.configuration_auto import CONFIG_MAPPING
from moeharden.model.checkpoint import load_config
from moeharden.model.selfcheck import check_adapter
cfg = load_config(sys.argv[1]) if sys.argv[1] != "-" else CONFIG_MAPPING[sys.argv[2]]()
t0 = time.perf_counter()
r = check_adapter(cfg)
print(time.perf_counter() - t0, r.ok)
"""


def _cli_seconds(args: list[str], out: Path, *extra: str, cache: Path, cold: bool) -> float:
    if cold:
        shutil.rmtree(cache / "selfcheck", ignore_errors=True)
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "moeharden", *args, "--out", str(out), "--json", *extra], check=True,
                   capture_output=True, env={**os.environ, "MOEHARDEN_CACHE": str(cache)})
    return time.perf_counter() - t0


def main(argv: list[str]) -> int:
    from moeharden.demo.build import build_demo_model
    from moeharden.model.checkpoint import checkpoint_layout

    work = Path(argv[0]) if argv else Path(tempfile.mkdtemp(prefix="moeharden-bench-selfcheck-"))
    demo = build_demo_model(work / "demo")
    _, spec, E, _, _, layers = checkpoint_layout(demo)
    keep = work / "keep.json"
    keep.write_text(json.dumps({"keep": {str(layer): list(range(E // 2)) for layer in layers}}))
    cache = work / "cache"                                      # the self-check's cache only (demo built above)
    keys = work / "keys"
    if not (keys / "moeharden.key").exists():
        subprocess.run([sys.executable, "-m", "moeharden", "keygen", "--out", str(keys)], check=True,
                       capture_output=True)
    policy = Path(__file__).resolve().parents[1] / "src" / "moeharden" / "data" / "policy-example.yaml"
    commands = {"prune": ["prune", str(demo), "--experts-from", str(keep)],
                "lock": ["lock", str(demo), "--policy", str(policy), "--key", str(keys / "moeharden.key")]}
    print(f"demo model: {spec.name}, {E} experts, MoE layers {layers}")
    for name, args in commands.items():
        _cli_seconds(args, work / f"{name}-warm", cache=cache, cold=True)     # page cache and bytecode
        without = statistics.median(_cli_seconds(args, work / f"{name}-without{i}", "--skip-self-check", cache=cache,
                                                 cold=True) for i in range(REPEATS))
        print(f"{name} CLI --skip-self-check          {without:6.2f} s (median of {REPEATS})")
        for cold in (True, False):
            w = statistics.median(_cli_seconds(args, work / f"{name}-with{int(cold)}{i}", cache=cache, cold=cold)
                                  for i in range(REPEATS))
            label = "cold (check runs)" if cold else "warm (cached)    "
            print(f"{name} CLI with self-check, {label} {w:6.2f} s   ratio (with - without) / with = "
                  f"{(w - without) / w:.3f}   (goal <= 0.10)")
    alone = []
    for _ in range(REPEATS):
        shutil.rmtree(cache / "selfcheck", ignore_errors=True)
        alone.append(float(subprocess.run([sys.executable, "-c", CHILD_SELFCHECK, str(demo)], check=True,
                                          capture_output=True, text=True, env={**os.environ, "MOEHARDEN_CACHE": str(cache)}
                                          ).stdout.split()[0]))
    print(f"self-check alone, cold, in a child   {statistics.median(alone):6.2f} s (the family's modeling import "
          "included)")
    for mt in ("deepseek_v3", "qwen3_5_moe_text", "nemotron_h", "gpt_oss", "longcat_flash"):
        shutil.rmtree(work / "cache2", ignore_errors=True)             # cold for each family
        s = subprocess.run([sys.executable, "-c", CHILD_SELFCHECK, "-", mt], check=True, capture_output=True,
                           text=True, env={**os.environ, "MOEHARDEN_CACHE": str(work / "cache2")}
                           ).stdout.split()
        print(f"self-check, cold, {mt:18s} {float(s[0]):5.2f} s  ok={s[1]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
