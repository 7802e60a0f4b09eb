"""One entangle step ÷ one plain fine-tuning step on the same batches (goal ≤ 3, without the
recovery term; the recovery, divergence, cancellation and token-partition terms' costs, and the demo recipe's, are
printed too). Demo model,
single-task batches of 32 for each task, median over steps (the keep-set pools are computed once,
outside the timing).
Run: .venv/bin/python bench/entangle.py [DEMO_MODEL_DIR]
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from importlib import resources
from pathlib import Path

import torch
import torch.nn.functional as F

from moeharden.defend.entangle.loop import entangle_model
from moeharden.defend.entangle.recipe import EntangleRecipe, load_recipe
from moeharden.model.checkpoint import load_model, load_tokenizer
from moeharden.tasks.encoding import answer_logits, encode
from moeharden.tasks.resolve import load_tasks


def plain_steps(model, tok, tasks, steps: int, batch: int) -> float:
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    model.train()
    ts = []
    for step in range(steps):
        t0 = time.perf_counter()
        for t in tasks:
            b = encode(tok, t.train[step * batch % len(t.train):][:batch])
            al, at = answer_logits(model(input_ids=b.input_ids, attention_mask=b.attention_mask).logits, b.labels)
            (F.cross_entropy(al, at) / len(tasks)).backward()
        opt.step()
        opt.zero_grad()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts[1:])


def entangle_steps(path, tok, tasks, recipe: EntangleRecipe) -> float:
    model = load_model(path)
    times = []
    last = [time.perf_counter()]

    def progress(n, **_):
        now = time.perf_counter()
        times.append(now - last[0])
        last[0] = now

    entangle_model(model, tok, tasks, recipe, progress=progress)
    return statistics.median(times[1:])


def main() -> None:
    torch.set_num_threads(2)
    if len(sys.argv) > 1:
        path = Path(sys.argv[1])
    else:
        from moeharden.demo.build import build_demo_model

        path = build_demo_model(Path(tempfile.mkdtemp(prefix="moeharden-bench-")) / "model")
    tok = load_tokenizer(path)
    tasks = load_tasks(None, checkpoint_dir=path)
    tp = plain_steps(load_model(path), tok, tasks, 12, 32)
    # recompute_every > steps: the attribution pools are built once, at step 0 (excluded: median)
    fixed = {"steps": 12, "batch_size": 32, "recompute_every": 10_000}
    te = entangle_steps(path, tok, tasks, EntangleRecipe(**fixed))
    tr = entangle_steps(path, tok, tasks, EntangleRecipe(**fixed, recovery_term=True))
    tdv = entangle_steps(path, tok, tasks, EntangleRecipe(**fixed, lambda_diverge=1.0))
    tc = entangle_steps(path, tok, tasks, EntangleRecipe(**fixed, lambda_cancel=1.0))
    tpa = entangle_steps(path, tok, tasks, EntangleRecipe(**fixed, lambda_partition=1.0))
    demo_recipe = resources.files("moeharden").joinpath("data/demo_entangle.yaml")
    with resources.as_file(demo_recipe) as f:
        td = entangle_steps(path, tok, tasks, load_recipe(f, **fixed))
    print(f"entangle step ÷ plain fine-tuning step: {te / tp:.2f} ({te * 1e3:.0f} ms vs {tp * 1e3:.0f} ms)  (goal ≤ 3)")
    print(f"with the simulated-recovery term (1 SGD step, every task): {tr / tp:.2f} ({tr * 1e3:.0f} ms)")
    print(f"with the divergence term (lambda_diverge): {tdv / tp:.2f} ({tdv * 1e3:.0f} ms)")
    print(f"with the cancellation term (lambda_cancel): {tc / tp:.2f} ({tc * 1e3:.0f} ms)")
    print(f"with the token-partition routing term (lambda_partition): {tpa / tp:.2f} ({tpa * 1e3:.0f} ms)")
    print(f"the demo recipe (data/demo_entangle.yaml): {td / tp:.2f} ({td * 1e3:.0f} ms)")


if __name__ == "__main__":
    main()
