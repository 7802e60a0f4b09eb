"""Does the demo model show the paper's finding? Prints, per task: full accuracy, accuracy when only
the 2 most frequently routed experts per layer are kept (and its retained fraction
``(kept - chance) / (full - chance)``), and accuracy with 2 random experts per layer (mean of 5).

Usage: ``python bench/demo_specialisation.py [MODEL_DIR]`` (default: build/reuse the demo model).
Expert masking sets the router logits of hidden experts to -inf, which is exactly what physically
pruning them does to Mixtral's softmax-then-top-k routing. Not a test: prints figures only.
"""

from __future__ import annotations

import json
import random
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from moeharden.demo.build import build_demo_model
from moeharden.demo.synthetic import TASKS
from moeharden.demo.train import evaluate_task


@contextmanager
def keep_only(model, keep: dict[int, list[int]]):
    """Route every token among ``keep[layer]`` only (router logits of the others set to -inf)."""
    handles = []
    for i, layer in enumerate(model.model.layers):
        gate = layer.mlp.gate
        mask = torch.full((gate.num_experts,), float("-inf"))
        mask[keep[i]] = 0.0

        def hook(mod, args, out, mask=mask):
            logits = out[0] + mask  # [N, E]
            probs = torch.softmax(logits.float(), -1)
            v, idx = torch.topk(probs, mod.top_k, -1)
            return logits, v / v.sum(-1, keepdim=True), idx

        handles.append(gate.register_forward_hook(hook))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def frequency_keep(model, tok, task, rows, k=2) -> dict[int, list[int]]:
    """Top-``k`` experts per layer by how often they are in a token's top-k on ``rows``."""
    counts = {}
    handles = []
    for i, layer in enumerate(model.model.layers):
        def hook(mod, args, out, i=i):
            idx = out[2]  # [N, top_k]
            counts[i] = counts.get(i, 0) + torch.bincount(idx.flatten(), minlength=mod.num_experts)
        handles.append(layer.mlp.gate.register_forward_hook(hook))
    ids = torch.tensor([tok(task.prompt_of(r) + task.answer_of(r)).input_ids for r in rows])
    model(input_ids=ids)
    for h in handles:
        h.remove()
    return {i: sorted(torch.topk(c, k).indices.tolist()) for i, c in counts.items()}


def main() -> None:
    torch.set_num_threads(2)
    if len(sys.argv) > 1:
        model_dir = Path(sys.argv[1])
    else:
        model_dir = build_demo_model(Path(tempfile.mkdtemp()) / "model")
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    tok = AutoTokenizer.from_pretrained(model_dir)
    n_exp, n_layers = model.config.num_local_experts, model.config.num_hidden_layers
    stats = json.loads((model_dir / "moeharden-demo-recipe.json").read_text())["training"]
    print(f"train {stats['train_seconds']} s wall, {stats['cpu_seconds']} s cpu, {stats['steps']} steps")
    print(f"{'task':10} {'full':>6} {'kept2':>6} {'retain':>7} {'rand2':>6}  keep-set")
    rng = random.Random(0)
    for name, task in TASKS.items():
        rows = [json.loads(x) for x in (model_dir / "tasks" / f"{name}.jsonl").read_text().splitlines()]
        attr, ev = rows[:128], rows[128:384]
        full = evaluate_task(model, tok, task, ev)
        keep = frequency_keep(model, tok, task, attr)
        with keep_only(model, keep):
            kept = evaluate_task(model, tok, task, ev)
        rand = []
        for _ in range(5):
            with keep_only(model, {i: rng.sample(range(n_exp), 2) for i in range(n_layers)}):
                rand.append(evaluate_task(model, tok, task, ev))
        retain = (kept - task.chance) / (full - task.chance)
        print(f"{name:10} {full:6.3f} {kept:6.3f} {retain:7.3f} {sum(rand) / len(rand):6.3f}  {keep}")


if __name__ == "__main__":
    main()
