"""Re-alignment attack: the selection step's time as a fraction of training time, per round and
strategy (goal ≤ 0.2), on the demo model pruned to 1 expert per layer by its best attacker.
Run: .venv/bin/python bench/recover.py [DEMO_MODEL_DIR]
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch

from moeharden.attack.attribution import keep_sets, observed_scores, routing_stats
from moeharden.attack.realign.run import RecoverySettings, run_recovery
from moeharden.attack.realign.selection import STRATEGIES
from moeharden.attack.realign.taskops import task_ops
from moeharden.model.checkpoint import load_model, load_tokenizer
from moeharden.model.masking import mask_experts
from moeharden.model.registry import moe_layers
from moeharden.tasks.resolve import load_tasks


def main() -> None:
    torch.set_num_threads(2)
    if len(sys.argv) > 1:
        path = Path(sys.argv[1])
    else:
        from moeharden.demo.build import build_demo_model

        path = build_demo_model(Path(tempfile.mkdtemp(prefix="moeharden-bench-")) / "model")
    model, tok = load_model(path), load_tokenizer(path)
    info = moe_layers(model)
    layers, E = [li.layer for li in info], info[0].num_experts
    for task in load_tasks(None, checkpoint_dir=path):
        scores = observed_scores(routing_stats(model, tok, task.calibration_texts(), layers, E))
        keep = keep_sets(scores["frequency"], layers, 1)
        for strategy in STRATEGIES:
            s = RecoverySettings(mode="full", strategy=strategy, budget=64, rounds=4, steps_per_round=30)
            run = run_recovery(model, task_ops(tok, task), task.train, s,
                               router_params=[li.router_weight for li in info],
                               mask=lambda keep=keep: mask_experts(model, keep))
            print(f"{task.name:10s} {strategy:8s} selection ÷ training = {run.select_seconds / run.train_seconds:.3f} "
                  f"(select {run.select_seconds:.2f} s, train {run.train_seconds:.2f} s over {s.rounds} rounds)")
    print("goal ≤ 0.2")


if __name__ == "__main__":
    main()
