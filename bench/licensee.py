"""Legitimate fine-tuning after the defense: the released model adapted within its policy, next to the original.

A licensee adapts the release to a *new* task (``demo.synthetic.LICENSEE_TASKS``: never in the
demo model's training data) under the demo policy (``data/policy-example.yaml``: LoRA up to rank
16 on attention, norms trainable, everything else frozen — enforced by
:func:`moeharden.defend.policy.apply` on every forward and gradient). Each checkpoint given is
fine-tuned the same way — same examples, same seeds, same learning-rate grid; the licensee keeps
the learning rate that scores best on 64 held-out labelled examples of its own — at 64 and 256
labels, and scored on 256 evaluation rows. Prints, per task and budget, each model's mean over
seeds with the Wilson 95% interval of the pooled rows, and whether the defended model's interval
overlaps the original's (the acceptance line of the defense: "the same accuracy within the
confidence intervals") or, where the intervals are apart, on which side: better or worse.

Run: .venv/bin/python bench/licensee.py ORIGINAL DEFENDED [--seeds 0 1 2] [--budgets 64 256]
     [--steps 150] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import random
import time
from importlib import resources
from pathlib import Path

LRS = (1e-3, 3e-3, 1e-2)
VALIDATION = 64
EVALUATION = 256
BATCH = 16


def _task(name: str, budget: int, seed: int):
    from moeharden.demo.synthetic import LICENSEE_TASKS, generate, task_spec
    from moeharden.tasks.examples import Task

    st = LICENSEE_TASKS[name]
    rows = generate(name, EVALUATION + VALIDATION + 512, seed=1000, distinct=True)
    evaluation = [st.example(r) for r in rows[:EVALUATION]]            # the same rows for every run
    pool = [st.example(r) for r in rows[EVALUATION:]]
    random.Random(seed).shuffle(pool)
    spec = task_spec(st)
    return Task(name=name, kind=st.kind, metric=spec.metric, chance=st.chance, attribution=[],
                evaluation=evaluation, train=pool[:budget], spec=spec), pool[budget:budget + VALIDATION]


def _finetune(ckpt: Path, task, val, lr: float, steps: int, seed: int):
    """Fine-tune a fresh load of ``ckpt`` within the demo policy; returns (validation, evaluation) results."""
    import torch
    import torch.nn.functional as F
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from moeharden.defend.policy import apply, load_policy
    from moeharden.model.registry import lora_targets
    from moeharden.tasks.encoding import BatchEncoder, answer_logits
    from moeharden.tasks.metrics import evaluate

    torch.manual_seed(seed)
    tok = AutoTokenizer.from_pretrained(ckpt)
    model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32)
    attention, _ = lora_targets(model)
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules=list(attention)))
    policy_path = resources.files("moeharden").joinpath("data/policy-example.yaml")
    with resources.as_file(policy_path) as pp:
        policy = load_policy(pp)
    guard = apply(model, policy)
    for n, p in model.named_parameters():                 # the groups the policy lets train (norms)
        if n in guard.group_of and policy.rule(guard.group_of[n]).mode == "trainable":
            p.requires_grad_(True)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    enc, rng = BatchEncoder(tok), random.Random(seed)
    model.train()
    for _ in range(steps):
        batch = enc(rng.sample(task.train, min(BATCH, len(task.train))))
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        al, at = answer_logits(logits, batch.labels)
        F.cross_entropy(al.float(), at).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    model.eval()
    guard.check()                                         # nothing outside the policy moved
    return (evaluate(model, tok, task, examples=val).value, evaluate(model, tok, task))


def main() -> None:
    from moeharden.demo.synthetic import LICENSEE_TASKS
    from moeharden.tasks.intervals import wilson

    ap = argparse.ArgumentParser()
    ap.add_argument("original", type=Path)
    ap.add_argument("defended", type=Path)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--budgets", type=int, nargs="+", default=[64, 256])
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    rows = []
    t0 = time.perf_counter()
    for name in LICENSEE_TASKS:
        for budget in args.budgets:
            res = {}
            for label, ckpt in (("original", args.original), ("defended", args.defended)):
                values, correct = [], 0.0
                for seed in args.seeds:
                    task, val = _task(name, budget, seed)
                    best = max((_finetune(ckpt, task, val, lr, args.steps, seed) + (lr,) for lr in LRS),
                               key=lambda r: (r[0], -r[2]))     # validation; ties: the smaller lr
                    values.append(best[1].value)
                    correct += best[1].value * best[1].n
                n = EVALUATION * len(args.seeds)
                lo, hi = wilson(correct, n)
                res[label] = {"mean": sum(values) / len(values), "per_seed": values, "lo": lo, "hi": hi}
            overlap = res["defended"]["hi"] >= res["original"]["lo"] and res["original"]["hi"] >= res["defended"]["lo"]
            o, d = res["original"], res["defended"]
            # apart: which side the defended model's interval lies on (the acceptance line asks it
            # to reach the original's accuracy: "better" meets it, "worse" does not)
            verdict = "same" if overlap else ("better" if d["lo"] > o["hi"] else "worse")
            rows.append({"task": name, "labels": budget, **res, "same_within_ci": overlap, "verdict": verdict})
            shown = {"same": "same within CI", "better": "BETTER (intervals apart)", "worse": "WORSE (intervals apart)"}
            print(f"{name:<9} {budget:>4} labels  original {o['mean']:.3f} [{o['lo']:.3f}, {o['hi']:.3f}]  "
                  f"defended {d['mean']:.3f} [{d['lo']:.3f}, {d['hi']:.3f}]  {shown[verdict]}", flush=True)
    print(f"({len(args.seeds)} seeds, lr grid {LRS} chosen on {VALIDATION} held-out labels, {args.steps} steps, "
          f"batch {BATCH}; {time.perf_counter() - t0:.0f} s)")
    if args.json:
        args.json.write_text(json.dumps({"seeds": args.seeds, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
