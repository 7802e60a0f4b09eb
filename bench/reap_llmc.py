"""Time llm-compressor's REAP expert pruning (``REAPPruningModifier``) on a local MoE checkpoint.

For comparing llm-compressor's REAP attribution time with moeharden's at real model width
(``bench/scale.py`` times moeharden's pass over the same calibration tokens). The checkpoint
(config.json + safetensors; no tokenizer needed) is loaded in bf16 on CPU with llm-compressor's
``load_quantizable_moe`` (experts linearized to ``LinearExperts2D``, which REAP requires); the
calibration data are 64 prompts x 128 token ids, ``torch.randint(3, min(V, 30000), (64, 128))``
from ``torch.Generator().manual_seed(0)`` (as in bench/scale.py), fed as a ready DataLoader
(batch 32 by default). ``oneshot`` then runs REAP with sparsity 0.5 (half the experts of every
MoE layer kept) through the chosen calibration pipeline. The model is pruned in memory; nothing
is saved.

Printed, one JSON line:

- ``calib_s``: from REAP's ``on_calibration_start`` (its hooks registered) to ``on_calibration_end``.
  basic: one hooked forward of the whole model (lm_head skipped) over all batches, then the
  pruning of every layer. sequential: per decoder layer a hooked pass and, by default, a second
  propagation pass through the just-pruned layer (so later layers are scored on the pruned
  model), plus caching the intermediates; the torch.fx tracing before it is not included.
- ``prune_s``: the part of ``calib_s`` spent in REAP's per-layer decision + structural pruning.
- ``attribution_s``: ``calib_s - prune_s``.  ``oneshot_s``: the whole ``oneshot`` call.
- ``load_s``, ``plain_s`` (with ``--plain``: one hook-free forward of ``model.model`` over the same
  batches, the linearized model as llm-compressor runs it), ``kept`` (layer -> kept expert ids,
  from REAP's report_path) and ``scores`` (layer -> REAP saliency per original expert, read from
  its trackers just before each layer is pruned; they are private and deleted afterwards).

Run with the llm-compressor venv's python, not moeharden's:
    /tmp/llmc-venv/bin/python bench/reap_llmc.py CHECKPOINT_DIR {basic,sequential}
        [--batch-size 32] [--threads 2] [--all-experts] [--plain]
``--all-experts`` keeps oneshot's default ``moe_calibrate_all_experts=True`` (every expert runs on
every token); without it only routed experts run, which is REAP's own definition and cheaper.
That venv (llmcompressor 0.14.0.1 pins transformers<=5.17, compressed-tensors 0.19.0, hub<2), with
moeharden's CPU torch reused instead of the CUDA wheels: ``python3 -m venv /tmp/llmc-venv``; a .pth
in its site-packages appending .venv/lib/python3.11/site-packages; then ``pip install --no-deps
llmcompressor==0.14.0.1 compressed-tensors==0.19.0 transformers==5.17.0 "huggingface_hub<2" loguru
"httpx<1" "httpcore<2"`` (the rest: torch, accelerate, datasets, ... come from moeharden's venv).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import time

import torch
from torch.utils.data import DataLoader
from transformers import AutoModelForCausalLM

with contextlib.redirect_stdout(sys.stderr):  # llmcompressor logs to the sys.stdout of its import: stderr
    from llmcompressor import oneshot
    from llmcompressor.modeling.moe.linearize import load_quantizable_moe
    from llmcompressor.modifiers.pruning.reap import REAPPruningModifier

ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
ap.add_argument("checkpoint")
ap.add_argument("pipeline", choices=["basic", "sequential"])
ap.add_argument("--batch-size", type=int, default=32)
ap.add_argument("--threads", type=int, default=2)
ap.add_argument("--all-experts", action="store_true")
ap.add_argument("--plain", action="store_true")
args = ap.parse_args()
torch.set_num_threads(args.threads)

marks: dict[str, float] = {"prune": 0.0}
scores: dict[str, list[float]] = {}
orig_start = REAPPruningModifier.on_calibration_start
orig_end = REAPPruningModifier.on_calibration_end
orig_epoch = REAPPruningModifier.on_sequential_epoch_end


def on_start(self, state, event, **kw):
    orig_start(self, state, event, **kw)
    marks["start"] = time.perf_counter()


def on_end(self, state, event, **kw):
    marks["end"] = time.perf_counter()
    orig_end(self, state, event, **kw)


def on_epoch(self, state, event, **kw):
    t0 = time.perf_counter()
    for name, tracker in self._saliency_trackers.items():
        if tracker.total_count > 0:
            scores[name] = [round(float(s), 6) for s in tracker.mean_saliency]
    orig_epoch(self, state, event, **kw)
    marks["prune"] += time.perf_counter() - t0


REAPPruningModifier.on_calibration_start = on_start
REAPPruningModifier.on_calibration_end = on_end
REAPPruningModifier.on_sequential_epoch_end = on_epoch

# transformers 5.17's apply_patches (used by load_quantizable_moe) calls dir() on every transformers
# module, and dir() of its lazy "*_fast" image-processor aliases imports them, which needs torchvision.
# Those aliases hold no expert classes, so an empty dir() for them changes nothing that is patched.
for mod in list(sys.modules.values()):
    if getattr(mod, "__name__", "").startswith("transformers") and (
        getattr(mod, "__doc__", None) or ""
    ).startswith("Alias module for backward"):
        mod.__dir__ = lambda: []

t0 = time.perf_counter()
with load_quantizable_moe():
    model = AutoModelForCausalLM.from_pretrained(args.checkpoint, dtype=torch.bfloat16, device_map="cpu")
model.eval()
load_s = time.perf_counter() - t0

V = model.config.get_text_config().vocab_size
ids = torch.randint(3, min(V, 30000), (64, 128), generator=torch.Generator().manual_seed(0))
rows = [{"input_ids": r, "attention_mask": torch.ones_like(r)} for r in ids]
loader = DataLoader(rows, batch_size=args.batch_size, shuffle=False)

plain_s = None
if args.plain:
    with torch.no_grad():
        t0 = time.perf_counter()
        for b in loader:
            model.model(**b)
        plain_s = time.perf_counter() - t0

report = os.path.join(tempfile.mkdtemp(prefix="reap_llmc_"), "kept.json")
t0 = time.perf_counter()
oneshot(
    model=model,
    processor=object(),  # a non-None stand-in: the checkpoint may have no tokenizer; a DataLoader needs none
    dataset=loader,
    recipe=REAPPruningModifier(sparsity=0.5, report_path=report),
    pipeline=args.pipeline,
    moe_calibrate_all_experts=args.all_experts,
    num_calibration_samples=len(rows),
)
oneshot_s = time.perf_counter() - t0
with open(report) as f:
    kept = json.load(f)

calib_s = marks["end"] - marks["start"]
print(
    json.dumps(
        {
            "pipeline": args.pipeline,
            "checkpoint": args.checkpoint,
            "batch_size": args.batch_size,
            "threads": args.threads,
            "all_experts": args.all_experts,
            "load_s": round(load_s, 3),
            "plain_s": None if plain_s is None else round(plain_s, 3),
            "oneshot_s": round(oneshot_s, 3),
            "calib_s": round(calib_s, 3),
            "prune_s": round(marks["prune"], 3),
            "attribution_s": round(calib_s - marks["prune"], 3),
            "kept": kept,
            "scores": scores,
        }
    )
)
