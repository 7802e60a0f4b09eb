"""Costs at real width: prune, lock and scan's attribution pass on checkpoints with the real configs.

Each target is the real config of a recipe target (Mixtral-8x7B, OLMoE-1B-7B, Qwen3-30B-A3B,
DeepSeek-V2-Lite, gpt-oss-20b: every width, head, expert and vocabulary size as released), random
weights in bf16, truncated to a few decoder layers, saved by transformers in the release's on-disk
layout in 2 GB shards. They are built here (in a child process) and deleted after their
measurements; nothing is committed. Measured per checkpoint, in child processes so that each peak
RSS is that command's own (interpreter, torch and transformers included: "raw"):

- ``prune`` (half of the experts kept in every MoE layer): peak RSS ÷ largest shard (goal ≤ 1.5),
  time ÷ a plain copy of the same files (goal ≤ 2; both from a warm page cache);
- ``lock``: tensor-hashing throughput ÷ ``sha256sum`` of the same files (goal ≥ 0.8), and the whole
  ``lock`` command's peak RSS ÷ largest shard (goal ≤ 1.5);
- ``scan``'s attribution pass (:func:`moeharden.attack.attribution.routing_stats`: every observed
  method's sums, norms and probabilities in one pass; 64 calibration prompts × 128 tokens, batch 32,
  packed by scan's token budget, ``token_budget``: 2,048 per forward on every truncated checkpoint)
  ÷ a plain forward of the same modules over as many tokens (4,096 per forward; goal ≤ 1.10), and in
  brackets ÷ a plain forward packed like scan (the record's own cost, apart from the budget's). Every
  timed pass reads token ids of its own, as a scan meets new prompts in every forward: oneDNN
  compiles a kernel for every new matmul shape (about 1.4 ms at OLMoE's width, 2–3× the matmul),
  and the experts' token counts are new shapes until its cache holds the ones that recur; repeated
  ids would let a pass reuse the very kernels of the pass before. Scan's peak RSS —
  sampled every 2 ms while the model loads (bf16) and during two attribution passes that run before any plain
  forward (the timing passes come after, and what the bench's own 4,096-token forwards leave
  behind is not scan's) — ÷ the model's weight bytes (goal ≤ 1.3), raw (the mmap'd shard pages
  transformers reads the weights through count in RSS) and private (RssAnon); scan's pass hands
  freed heap blocks back after every forward (``io/allocator.py``), oneDNN keeps its default
  cache of 1,024 compiled kernels, as in the CLI;
- growth: the same figures for OLMoE at 1, 2 and 4 layers with 64 and 32 experts, fitted as
  ``cost = a + b·layers``; the table gives the slope b and the largest relative deviation of a
  point from the line (linear in layers is the goal).

Each checkpoint's row also records the machine's matmul speed when it was measured (bf16 and fp32
GFLOP/s, printed under the table): a CPU without native bf16 (no AVX512-BF16 / AMX) runs bf16
matmuls 50–60× slower than fp32, and seconds from different machines are not comparable.
Results are kept in ``WORKDIR/scale.json`` (a re-run skips what is measured; ``--only NAME ...``
measures those again, ``--fresh`` everything). ``--no-scan`` measures prune and lock only: on a CPU
without native bf16 scan's bf16 forwards take most of an hour per checkpoint, prune and lock (I/O
and hashing, no matmul) a minute or two; scan's cells then read "not measured" and its goals are
judged on the rows that have them (a later run without the flag fills them in). ``--scan-dtype
float32`` loads the model for scan in float32 instead (two bytes per stored one: RSS is divided by
the float32 weights): on such a CPU it measures how scan's costs grow in minutes rather than hours,
as a proxy; those rows are marked and never judged against the goals, which are bf16 figures.
With ``--llmc PYTHON`` (the venv of ``bench/reap_llmc.py``), llm-compressor's REAP runs on the
Qwen3, Mixtral and 2-layer OLMoE checkpoints over the same tokens: its attribution seconds per
pipeline beside moeharden's, and whether it keeps the experts moeharden's ``reap`` keeps.
``--full-depth`` adds one recipe target at its released size, every layer: OLMoE-1B-7B (16 layers, 64
experts, 6.9 B parameters, 13.8 GB in bf16; the only target whose whole model fits this machine's
24 GB beside scan's working memory). Its row is judged on a goal line of its own, beside the truncated
rows' (theirs carry a fixed cost — the 253 MB import baseline and one layer's attribution transient
— that is a larger share of a smaller model), and the growth table compares the line fitted at 1, 2 and 4 layers
with what it measures at 16.
Run: .venv/bin/python bench/scale.py [WORKDIR] [--only NAME ...] [--fresh] [--no-scan] [--scan-dtype float32]
     [--llmc PYTHON] [--full-depth]
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

sys.path.insert(0, str(Path(__file__).resolve().parent))
from lock import CHILD_HASH, CHILD_LOCK, POLICY  # noqa: E402  (the lock bench's children, reused)

SHARD = "2GB"
CALIB_PROMPTS, CALIB_TOKENS, BATCH = 64, 128, 32
REPEATS = 3           # copies and prunes per checkpoint (2 above 3 GB)
SCAN_REPEATS = 5      # interleaved plain / attributed passes: the median of each

# The released configs (config.json of each model), minus the layer count set per checkpoint.
TARGETS: dict[str, tuple[str, dict]] = {
    "mixtral-8x7b": ("MixtralConfig", dict(
        vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
        num_local_experts=8, num_experts_per_tok=2, max_position_embeddings=32768, rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": 1e6}, sliding_window=None, tie_word_embeddings=False,
        router_aux_loss_coef=0.02, bos_token_id=1, eos_token_id=2)),
    "olmoe-1b-7b": ("OlmoeConfig", dict(
        vocab_size=50304, hidden_size=2048, intermediate_size=1024, num_attention_heads=16, num_key_value_heads=16,
        num_experts=64, num_experts_per_tok=8, max_position_embeddings=4096, rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, norm_topk_prob=False, clip_qkv=None,
        router_aux_loss_coef=0.01, pad_token_id=1, eos_token_id=50279, tie_word_embeddings=False)),
    "qwen3-30b-a3b": ("Qwen3MoeConfig", dict(
        vocab_size=151936, hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768,
        num_attention_heads=32, num_key_value_heads=4, head_dim=128, num_experts=128, num_experts_per_tok=8,
        norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[], max_position_embeddings=40960,
        rms_norm_eps=1e-6, rope_parameters={"rope_type": "default", "rope_theta": 1e6}, tie_word_embeddings=False,
        router_aux_loss_coef=0.001, bos_token_id=151643, eos_token_id=151645)),
    "deepseek-v2-lite": ("DeepseekV2Config", dict(
        vocab_size=102400, hidden_size=2048, intermediate_size=10944, moe_intermediate_size=1408,
        num_attention_heads=16, num_key_value_heads=16, n_shared_experts=2, n_routed_experts=64,
        num_experts_per_tok=6, first_k_dense_replace=1, kv_lora_rank=512, q_lora_rank=None, qk_nope_head_dim=128,
        qk_rope_head_dim=64, v_head_dim=128, head_dim=64, routed_scaling_factor=1.0, topk_method="greedy",
        n_group=1, topk_group=1, norm_topk_prob=False, max_position_embeddings=163840, rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 40.0, "beta_fast": 32.0,
                         "beta_slow": 1.0, "mscale": 0.707, "mscale_all_dim": 0.707,
                         "original_max_position_embeddings": 4096},
        tie_word_embeddings=False, bos_token_id=100000, eos_token_id=100001)),
    "gpt-oss-20b": ("GptOssConfig", dict(
        vocab_size=201088, hidden_size=2880, intermediate_size=2880, num_attention_heads=64, num_key_value_heads=8,
        head_dim=64, num_local_experts=32, num_experts_per_tok=4, sliding_window=128,
        max_position_embeddings=131072, rms_norm_eps=1e-5, swiglu_limit=7.0, attention_bias=True,
        rope_parameters={"rope_type": "yarn", "rope_theta": 150000.0, "factor": 32.0, "beta_fast": 32.0,
                         "beta_slow": 1.0, "truncate": False, "original_max_position_embeddings": 4096},
        tie_word_embeddings=False, router_aux_loss_coef=0.9, pad_token_id=199999, eos_token_id=200002)),
}
# (name, target, decoder layers, expert-count override): the five targets, then OLMoE's growth grid
CHECKPOINTS = [
    ("mixtral-8x7b/L1", "mixtral-8x7b", 1, None),
    ("qwen3-30b-a3b/L1", "qwen3-30b-a3b", 1, None),
    ("deepseek-v2-lite/L2", "deepseek-v2-lite", 2, None),     # layer 0 is dense in the release, layer 1 MoE
    ("gpt-oss-20b/L1", "gpt-oss-20b", 1, None),
    *[(f"olmoe-1b-7b/L{n}E{e}", "olmoe-1b-7b", n, e) for e in (64, 32) for n in (1, 2, 4)],
]
# With --full-depth: a recipe target at its released size, every layer (the only one that fits this
# machine's 24 GB with scan's model in memory: OLMoE-1B-7B, 6.9 B parameters, 13.8 GB in bf16).
FULL_DEPTH = [("olmoe-1b-7b/L16E64 (full)", "olmoe-1b-7b", 16, None)]
EXPERT_KEY = {"olmoe-1b-7b": "num_experts"}
LLMC_CHECKPOINTS = ("qwen3-30b-a3b/L1", "mixtral-8x7b/L1", "olmoe-1b-7b/L2E64")   # with --llmc

CHILD_BUILD = """
import json, sys, torch, transformers
cls, kw, path, shard = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3], sys.argv[4]
cfg = getattr(transformers, cls)(**kw)
torch.manual_seed(0)
torch.set_default_dtype(torch.bfloat16)          # initialise in bf16: never a float32 copy
model = transformers.AutoModelForCausalLM.from_config(cfg)
cfg.dtype = torch.bfloat16
model.save_pretrained(path, max_shard_size=shard)
print("built")
"""
CHILD_PRUNE = """
import sys, json, resource, time
from pathlib import Path
from moeharden.model.checkpoint import load_config
from moeharden.attack.prune import prune_checkpoint
keep = {int(k): v for k, v in json.loads(sys.argv[3]).items()}
load_config(Path(sys.argv[1]))
t0 = time.perf_counter()
prune_checkpoint(Path(sys.argv[1]), Path(sys.argv[2]), keep, max_shard_size="2GB")
print(time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""
CHILD_SCAN = """
import json, resource, statistics, sys, time
from pathlib import Path
import torch
from moeharden.attack.attribution import routing_stats
from moeharden.model.checkpoint import load_model
from moeharden.model.registry import moe_layers
import threading
torch.set_num_threads(2)
prompts, tokens, batch, reps = (int(x) for x in sys.argv[2:6])
dtype = getattr(torch, sys.argv[6])
phase = ["load"]
peaks = {}   # phase -> [peak VmRSS kB, peak RssAnon kB]: RSS counts the mmap'd shard pages, RssAnon only private

def sample():
    while True:
        got = {}
        for line in open("/proc/self/status"):
            if line.startswith(("VmRSS:", "RssAnon:")):
                got[line.split(":")[0]] = int(line.split()[1])
        pk = peaks.setdefault(phase[0], [0, 0])
        pk[0], pk[1] = max(pk[0], got["VmRSS"]), max(pk[1], got["RssAnon"])
        time.sleep(0.002)

threading.Thread(target=sample, daemon=True).start()
model = load_model(Path(sys.argv[1]), dtype=dtype)
time.sleep(0.01)
info = moe_layers(model)
layers, E = [li.layer for li in info], info[0].num_experts
weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
V = model.config.vocab_size

def token_ids(seed):
    return torch.randint(3, min(V, 30000), (prompts, tokens), generator=torch.Generator().manual_seed(seed))

ids = token_ids(0)                    # scan's passes (and llm-compressor's, bench/reap_llmc.py): seed 0

class Ids:   # the calibration "texts" are token-id rows; this plays the tokenizer's part
    def __call__(self, rows, **_):
        x = torch.stack(list(rows))
        return {"input_ids": x, "attention_mask": torch.ones_like(x)}

base = model.base_model
from moeharden.attack.attribution import token_budget, token_groups
budget = token_budget(model)
packed = token_groups([tokens] * prompts, batch, budget)      # scan's packing: rows per forward

@torch.no_grad()
def plain(x_all, groups):
    for g in groups:
        x = x_all[g[0]:g[-1] + 1]
        base(input_ids=x, attention_mask=torch.ones_like(x))

last = []

def attributed(x_all, keep=False):
    got = routing_stats(model, Ids(), list(x_all), layers, E, batch_size=batch)
    if keep:
        last[:] = [got]

@torch.no_grad()
def lm_forward():
    for i in range(0, prompts, batch):
        x = ids[i:i + batch]
        model(input_ids=x, attention_mask=torch.ones_like(x))

whole = [list(range(i, min(i + batch, prompts))) for i in range(0, prompts, batch)]   # the bench's forwards
phase[0] = "scan"                     # scan's own: the load, then its passes (two), before any plain forward
attributed(ids, keep=True); attributed(ids); time.sleep(0.01)
# Timed passes: every pass reads token ids of its own (a scan meets new prompts in every forward;
# passes that repeated the same ids would reuse the exact kernels oneDNN compiled for the experts'
# token counts in the pass before). "plain": the bench's forwards of a whole batch (4,096 tokens);
# "plain_packed": scan's packing (the token budget); "attributed": scan's pass.
fns = [lambda x: plain(x, whole), lambda x: plain(x, packed), attributed]
names = ["plain", "plain_packed", "attributed"]   # the timing passes: their peaks are recorded, not scan's
phase[0] = "plain"; plain(token_ids(1), whole); time.sleep(0.01)
ts = [[], [], []]
for rep in range(reps):
    for i, f in enumerate(fns):
        phase[0] = names[i]
        x = token_ids(1000 + len(fns) * rep + i)
        t0 = time.perf_counter(); f(x); ts[i].append(time.perf_counter() - t0)
        time.sleep(0.01)
phase[0] = "after"
peak_attr = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
time.sleep(0.02)
t0 = time.perf_counter(); lm_forward(); t_lm = time.perf_counter() - t0
from moeharden.attack.attribution import keep_sets, observed_scores
reap = observed_scores(last[0])["reap"]
reap_keep = keep_sets(reap, layers, E // 2)
print(json.dumps({"plain": statistics.median(ts[0]), "plain_packed": statistics.median(ts[1]),
                  "attributed": statistics.median(ts[2]), "lm_forward": t_lm, "budget": budget, "ids": "fresh",
                  "reap_keep": {str(k): v for k, v in reap_keep.items()},
                  "reap_scores": {str(layer): [float(x) for x in row] for layer, row in zip(layers, reap, strict=True)},
                  "peak_kb": peak_attr, "weight_bytes": weight_bytes,
                  "scan_kb": max(peaks["load"][0], peaks["scan"][0]),
                  "scan_anon_kb": max(peaks["load"][1], peaks["scan"][1]),
                  "phases": {k: v for k, v in peaks.items() if k != "after"}}))
"""
CHILD_SPEED = """
import json, time, torch
torch.set_num_threads(2)
out = {}
for name, dt in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
    a, b = torch.randn(256, 1024, dtype=dt), torch.randn(1024, 1024, dtype=dt)
    a @ b
    t0 = time.perf_counter()
    for _ in range(3):
        a @ b
    out[name] = round(3 * 2 * 256 * 1024 * 1024 / (time.perf_counter() - t0) / 1e9, 2)
print(json.dumps(out))
"""
CHILD_BASE = """
import resource
import moeharden.attack.prune, moeharden.attack.attribution, moeharden.defend.lock, moeharden.defend.manifest
import moeharden.model.checkpoint, safetensors.torch, torch, transformers
from transformers import AutoModelForCausalLM
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def _py(code: str, *args, **kw) -> str:
    res = subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True, **kw)
    if res.returncode:
        raise RuntimeError(res.stderr[-3000:])
    out = res.stdout.strip().splitlines()
    return out[-1] if out else ""


def _config(target: str, layers: int, experts: int | None) -> tuple[str, dict]:
    cls, kw = TARGETS[target]
    kw = dict(kw, num_hidden_layers=layers)
    if experts is not None:
        kw[EXPERT_KEY[target]] = experts
    if cls == "GptOssConfig":
        kw["layer_types"] = ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(layers)]
    return cls, kw


def _keep(target: str, kw: dict) -> dict[str, list[int]]:
    """Half of the experts (a seeded random half) in every MoE layer of the checkpoint."""
    import random

    E = next(kw[k] for k in ("num_local_experts", "num_experts", "n_routed_experts") if k in kw)
    first = kw.get("first_k_dense_replace", 0)
    rng = random.Random(0)
    return {str(layer): sorted(rng.sample(range(E), E // 2)) for layer in range(first, kw["num_hidden_layers"])}


def measure(name: str, target: str, layers: int, experts: int | None, work: Path, base_kb: int,
            llmc: str | None = None, scan: bool = True, scan_dtype: str = "bfloat16") -> dict:
    cls, kw = _config(target, layers, experts)
    src = work / "ckpt"
    shutil.rmtree(src, ignore_errors=True)
    t0 = time.perf_counter()
    _py(CHILD_BUILD, cls, json.dumps(kw), src, SHARD)
    build_s = time.perf_counter() - t0
    shards = sorted(src.glob("*.safetensors"))
    largest, total = max(p.stat().st_size for p in shards), sum(p.stat().st_size for p in shards)
    subprocess.run(["cat", *map(str, shards)], stdout=subprocess.DEVNULL, check=True)   # warm the page cache
    r: dict = {"name": name, "layers": layers, "shards": len(shards), "largest": largest, "bytes": total,
               "build_s": round(build_s, 1), "matmul_gflops": json.loads(_py(CHILD_SPEED))}
    keep = json.dumps(_keep(target, kw))
    copies, prunes, prune_kb = [], [], []
    for i in range(REPEATS if total < 3e9 else 2):
        dst = work / "copy"
        dst.mkdir()
        t0 = time.perf_counter()
        for p in src.iterdir():
            shutil.copyfile(p, dst / p.name)
        copies.append(time.perf_counter() - t0)
        shutil.rmtree(dst)
        t, kb = _py(CHILD_PRUNE, src, work / f"pruned{i}", keep).split()
        prunes.append(float(t))
        prune_kb.append(int(kb))
        shutil.rmtree(work / f"pruned{i}")
    r.update(copy_s=statistics.median(copies), prune_s=statistics.median(prunes), prune_kb=max(prune_kb),
             full_depth=any(name == n for n, *_ in FULL_DEPTH))
    t0 = time.perf_counter()
    subprocess.run(["sha256sum", *map(str, shards)], stdout=subprocess.DEVNULL, check=True)
    r["sha256sum_s"] = time.perf_counter() - t0
    r["hash_s"] = float(_py(CHILD_HASH, src))
    (work / "policy.yaml").write_text(POLICY)
    keys = work / "keys"
    if not keys.exists():
        subprocess.run([sys.executable, "-m", "moeharden", "lock", "keygen", "--out", str(keys)], check=True,
                       capture_output=True)
    shutil.rmtree(work / "locked", ignore_errors=True)
    r["lock_kb"] = int(_py(CHILD_LOCK, src, work / "policy.yaml", keys / "moeharden.key", work / "locked"))
    shutil.rmtree(work / "locked")
    r["base_kb"] = base_kb
    if scan:
        reps = SCAN_REPEATS if total < 8e9 else 3                         # a minute per pass at full depth
        r.update(json.loads(_py(CHILD_SCAN, src, CALIB_PROMPTS, CALIB_TOKENS, BATCH, reps, scan_dtype)),
                 scan_dtype=scan_dtype)
    if scan and llmc and name in LLMC_CHECKPOINTS:
        r["llmc"] = _llmc(llmc, src, r["reap_keep"], r["reap_scores"])
    shutil.rmtree(src)
    return r


def _llmc(python: str, src: Path, ours: dict[str, list[int]], scores: dict[str, list[float]]) -> dict:
    """llm-compressor's REAP (bench/reap_llmc.py, in its own venv) on the same tokens: seconds of its
    attribution pass per pipeline, whether its keep-set is moeharden's ``reap`` keep-set, and the
    largest relative difference of its scores from moeharden's (both in bf16: ties decide keep-sets
    of random-weight experts, so the scores are the comparison that means something)."""
    out = {}
    for pipeline in ("basic", "sequential"):
        res = subprocess.run([python, str(Path(__file__).with_name("reap_llmc.py")), str(src), pipeline,
                              "--batch-size", str(BATCH), "--threads", "2"], capture_output=True, text=True)
        if res.returncode:
            out[pipeline] = {"error": res.stderr.strip().splitlines()[-1][:300] if res.stderr.strip() else "failed"}
            continue
        got = json.loads(res.stdout.strip().splitlines()[-1])
        kept = {str(int(k.split(".")[2])): sorted(v) for k, v in got["kept"].items()}   # model.layers.N.mlp
        out[pipeline] = {"attribution_s": got["attribution_s"], "calib_s": got["calib_s"],
                         "same_keep": kept == {k: sorted(v) for k, v in ours.items()},
                         "layers_differing": sorted(k for k in kept if kept[k] != sorted(ours.get(k, []))),
                         "score_rel_diff": max((abs(a - b) / max(abs(b), 1e-12)
                                                for name, row in got.get("scores", {}).items()
                                                for a, b in zip(row, scores[str(int(name.split(".")[2]))],
                                                                strict=True)), default=None)}
    return out


def _fit(xs: list[float], ys: list[float]) -> tuple[float, float, float]:
    """Least-squares ``y = a + b·x``; returns (a, b, largest |residual| ÷ y)."""
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sum((x - mx) ** 2 for x in xs)
    a = my - b * mx
    return a, b, max(abs(y - (a + b * x)) / y for x, y in zip(xs, ys, strict=True))


def _scan_kb(r: dict) -> tuple[int, int]:
    """Scan's own peak (load + attribution pass; the bench's plain-forward baseline excluded): RSS and
    private kB. Results measured before the phases were sampled give the whole child's peak."""
    if "scan_kb" in r:
        return r["scan_kb"], r["scan_anon_kb"]
    return r["peak_kb"], r.get("anon_kb", 0)


def _mark(ok: bool) -> str:
    return "met" if ok else "MISSED"


def table(results: dict[str, dict]) -> str:
    lines = ["| checkpoint | size (shards, largest) | prune RSS ÷ shard (raw / above imports) | prune ÷ cp | "
             "hash ÷ sha256sum | lock RSS ÷ shard (raw / above) | attribution ÷ forward | scan RSS ÷ weights "
             "(raw / above / private) |", "|---|---|---|---|---|---|---|---|"]
    keys = ("prune_rss", "prune_time", "hash", "lock_rss", "attr", "scan_rss", "scan_private")
    goals: dict[str, list[float]] = {k: [] for k in keys}
    full: dict[str, list[float]] = {k: [] for k in keys}          # the rows at released depth (--full-depth)
    for name, r in results.items():
        bucket = full if r.get("full_depth") else goals
        sh = r["largest"]
        pr, pa = r["prune_kb"] * 1024 / sh, (r["prune_kb"] - r["base_kb"]) * 1024 / sh
        lr, la = r["lock_kb"] * 1024 / sh, (r["lock_kb"] - r["base_kb"]) * 1024 / sh
        pt, hs = r["prune_s"] / r["copy_s"], r["sha256sum_s"] / r["hash_s"]
        for k, v in (("prune_rss", pr), ("prune_time", pt), ("hash", hs), ("lock_rss", lr)):
            bucket[k].append(v)
        scan_cells = "not measured | not measured"                     # measured with --no-scan
        if "attributed" in r and r.get("scan_dtype", "bfloat16") != "bfloat16":   # a proxy, not the goal's figure
            kb, anon = _scan_kb(r)
            scan_cells = (f"{r['attributed'] / r['plain']:.3f} ({r['scan_dtype']}) | "
                          f"{kb * 1024 / r['weight_bytes']:.2f} / {(kb - r['base_kb']) * 1024 / r['weight_bytes']:.2f}"
                          f" / {anon * 1024 / r['weight_bytes']:.2f} ({r['scan_dtype']}: not judged)")
        elif "attributed" in r:
            kb, anon = _scan_kb(r)
            sr, sa = kb * 1024 / r["weight_bytes"], (kb - r["base_kb"]) * 1024 / r["weight_bytes"]
            sp, at = anon * 1024 / r["weight_bytes"], r["attributed"] / r["plain"]
            for k, v in (("attr", at), ("scan_rss", sr), ("scan_private", sp)):
                bucket[k].append(v)
            same = f" ({r['attributed'] / r['plain_packed']:.3f} at scan's packing)" if "plain_packed" in r else ""
            scan_cells = f"{at:.3f}{same} | {sr:.2f} / {sa:.2f} / {sp:.2f}"
        lines.append(f"| {name} | {r['bytes'] / 1e9:.2f} GB ({r['shards']}, {sh / 1e9:.2f} GB) | {pr:.2f} / {pa:.2f} | "
                     f"{pt:.2f} | {hs:.2f} | {lr:.2f} / {la:.2f} | {scan_cells} |")
    for label, got in (("goals (raw), truncated checkpoints", goals), ("goals (raw), released depth", full)):
        if not any(got.values()):
            continue
        lim = {"prune_rss": ("≤ 1.5", max, lambda v: v <= 1.5), "prune_time": ("≤ 2", max, lambda v: v <= 2),
               "hash": ("≥ 0.8", min, lambda v: v >= 0.8), "lock_rss": ("≤ 1.5", max, lambda v: v <= 1.5),
               "attr": ("≤ 1.10", max, lambda v: v <= 1.10), "scan_rss": ("≤ 1.3", max, lambda v: v <= 1.3),
               "scan_private": ("≤ 1.3", max, lambda v: v <= 1.3)}
        cells = [f"worst {pick(got[k]):.2f} over {len(got[k])} (goal {g}: {_mark(ok(pick(got[k])))})"
                 if got[k] else f"not measured (goal {g})" for k, (g, pick, ok) in lim.items()]
        lines.append(f"| **{label}** | | {cells[0]} | {cells[1]} | {cells[2]} | {cells[3]} | {cells[4]} | "
                     f"raw {cells[5]}; private {cells[6]} |")
    return "\n".join(lines)


def growth(results: dict[str, dict]) -> str:
    lines = ["| OLMoE experts | cost | 1 / 2 / 4 layers | slope per layer | worst deviation from the line |",
             "|---|---|---|---|---|"]
    costs = {"prune s": lambda r: r["prune_s"], "prune peak RSS GB": lambda r: r["prune_kb"] / 2**20,
             "hash s": lambda r: r["hash_s"], "lock peak RSS GB": lambda r: r["lock_kb"] / 2**20,
             "attribution s": lambda r: r["attributed"], "plain forward s": lambda r: r["plain"],
             "scan peak RSS GB": lambda r: _scan_kb(r)[0] / 2**20,
             "scan peak private GB": lambda r: _scan_kb(r)[1] / 2**20, "weights GB": lambda r: r["weight_bytes"] / 2**30}
    for e in (64, 32):
        pts = [results.get(f"olmoe-1b-7b/L{n}E{e}") for n in (1, 2, 4)]
        if any(p is None for p in pts):
            continue
        dtypes = {p.get("scan_dtype", "bfloat16") for p in pts if "attributed" in p}
        if len(dtypes) > 1:                                    # scan costs of different dtypes: no line
            pts = [{k: v for k, v in p.items() if k != "attributed"} for p in pts]
        elif dtypes and dtypes != {"bfloat16"}:
            lines.append(f"| {e} | scan costs below: the model loaded in {dtypes.pop()} | | | |")
        for label, f in costs.items():
            try:
                ys = [f(p) for p in pts]
            except KeyError:                                   # scan's costs, measured with --no-scan
                lines.append(f"| {e} | {label} | not measured | | |")
                continue
            a, b, dev = _fit([1, 2, 4], ys)
            lines.append(f"| {e} | {label} | {' / '.join(f'{y:.2f}' for y in ys)} | {b:.3f} | {dev:.1%} |")
            for name, _, n, experts in FULL_DEPTH:           # the line against the released depth, measured
                r = results.get(name)
                if r is not None and (experts or 64) == e:
                    try:
                        got = f(r)
                    except KeyError:
                        continue
                    lines.append(f"| {e} | {label} at {n} layers | line {a + b * n:.2f}, measured {got:.2f} | | "
                                 f"{(got - (a + b * n)) / got:+.1%} |")
    return "\n".join(lines)


def main() -> None:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("work", nargs="?", type=Path, help="where checkpoints are built and scale.json is kept")
    ap.add_argument("--only", nargs="+", help="measure (again) only these checkpoints")
    ap.add_argument("--fresh", action="store_true", help="measure everything again")
    ap.add_argument("--llmc", help="python of the llm-compressor venv (bench/reap_llmc.py)")
    ap.add_argument("--full-depth", action="store_true",
                    help="also OLMoE-1B-7B at its released 16 layers (13.8 GB; about 25 min and 16 GB of memory)")
    ap.add_argument("--no-scan", action="store_true", help="prune and lock only (scan's cells: not measured)")
    ap.add_argument("--scan-dtype", choices=("bfloat16", "float32"), default="bfloat16",
                    help="the dtype scan loads the model in (float32: a proxy for the growth figures on a CPU "
                         "without native bf16; its rows are not judged against the goals)")
    args = ap.parse_args()
    fresh, only, llmc = args.fresh, set(args.only or ()), args.llmc
    work = args.work or Path(tempfile.mkdtemp(prefix="moeharden-scale-"))
    work.mkdir(parents=True, exist_ok=True)
    store = work / "scale.json"
    results = {} if fresh or not store.exists() else json.loads(store.read_text())
    base_kb = int(_py(CHILD_BASE))
    todo = CHECKPOINTS + (FULL_DEPTH if args.full_depth or only & {n for n, *_ in FULL_DEPTH} else [])
    for name, target, layers, experts in todo:
        if (only and name not in only) or (name in results and not only and ("attributed" in results[name]
                                                                              or args.no_scan)):
            continue                                       # --only NAME measures NAME again
        print(f"measuring {name} ...", flush=True)
        results[name] = measure(name, target, layers, experts, work, base_kb, llmc, scan=not args.no_scan,
                                scan_dtype=args.scan_dtype)
        store.write_text(json.dumps(results, indent=1))
    print(f"\nimport baseline (interpreter, torch, transformers, moeharden): {base_kb / 1024:.0f} MB\n")
    print(table(results))
    speeds = {n: r["matmul_gflops"] for n, r in results.items() if "matmul_gflops" in r}
    if speeds:      # times from different machines (or days) are not comparable; ratios within a row are
        print("\nmatmul speed when measured (GFLOP/s, 256x1024 @ 1024x1024, 2 threads): " +
              "; ".join(f"{n} bf16 {g['bf16']} / fp32 {g['fp32']}" for n, g in speeds.items()))
    print()
    print(growth(results))
    rows = [(n, r) for n, r in results.items() if "llmc" in r]
    if rows:
        print("\n| checkpoint | moeharden attribution s | llm-compressor REAP basic s (same keep-set; scores) | "
              "sequential s (same keep-set; layers differing; scores) |\n|---|---|---|---|")
        for n, r in rows:
            cells = []
            for p in ("basic", "sequential"):
                x = r["llmc"][p]
                diff = x.get("score_rel_diff")
                cells.append(f"failed: {x['error']}" if "error" in x else
                             f"{x['attribution_s']:.2f} ({'yes' if x['same_keep'] else 'no'}"
                             + ("" if p == "basic" else f"; {', '.join(x['layers_differing']) or '-'}")
                             + ("" if diff is None else f"; scores within {diff:.1%}") + ")")
            print(f"| {n} | {r['attributed']:.2f} | {cells[0]} | {cells[1]} |")


if __name__ == "__main__":
    main()
