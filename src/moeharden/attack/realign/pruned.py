"""``prune --recover``: re-align a physically pruned checkpoint in place, and record how.

The attacker's finished artifact: the pruned checkpoint after one re-alignment run on a label
budget (:func:`moeharden.attack.realign.run.run_recovery` with ``keep_trained``), rewritten
atomically, its ``moeharden-prune.json`` extended with the run's settings and learning curve.
"""

from __future__ import annotations

import json
from pathlib import Path

from moeharden.attack.keepsearch import attack_tasks
from moeharden.attack.prune import PRUNE_RECORD
from moeharden.attack.realign.run import RecoverySettings, run_recovery
from moeharden.attack.realign.taskops import task_ops


def recover_pruned(path: Path, *, task: str, mode: str, strategy: str, budget: int, seed: int,
                   max_shard_size: str = "2GB") -> dict:
    """Re-align a physically pruned checkpoint in place (atomically) and record how in its prune record.

    Args:
        path: a checkpoint written by :func:`moeharden.attack.prune.prune_checkpoint`.
        task: the task whose labels the attacker buys (see
            :func:`moeharden.attack.keepsearch.attack_tasks`).
        mode, strategy, budget, seed: of the run (:class:`RecoverySettings`).
        max_shard_size: cap of each rewritten shard.
    Returns:
        the ``recovery`` entry added to the prune record (settings, labels used, curve).
    Raises:
        TaskError; UsageError (unknown mode/strategy, budget below 1); UnsupportedModelError.
    """
    from moeharden.io.outputs import atomic_output_dir
    from moeharden.io.sidefiles import copy_side_files
    from moeharden.model.checkpoint import load_model, load_tokenizer, quiet_transformers
    from moeharden.model.registry import lora_targets, moe_layers

    settings = RecoverySettings(mode=mode, strategy=strategy, budget=budget, seed=seed)
    t, _ = attack_tasks(path, task, None)
    model, tok = load_model(path), load_tokenizer(path)
    info = moe_layers(model)
    params = [li.router_weight for li in info] + [li.router_bias for li in info if li.router_bias is not None]
    run = run_recovery(model, task_ops(tok, t), t.train, settings, router_params=params,
                       lora_targets=lora_targets(info), keep_trained=True)
    record = json.loads((path / PRUNE_RECORD).read_text())
    record["recovery"] = {"task": t.name, "mode": mode, "strategy": strategy, "budget": budget, "seed": seed,
                          "labels_used": run.labels_used, "curve": run.points}
    with atomic_output_dir(path, kind="prune") as tmp:       # still a pruned checkpoint
        with quiet_transformers():
            model.save_pretrained(tmp, safe_serialization=True, max_shard_size=max_shard_size)
        tok.save_pretrained(tmp)
        copy_side_files(path, tmp)          # task file and data, model card; the record is rewritten below
        (tmp / PRUNE_RECORD).write_text(json.dumps(record, indent=2) + "\n")
    return record["recovery"]
