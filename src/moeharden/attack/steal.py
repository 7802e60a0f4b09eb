"""`moeharden prune`: the attacker's whole artifact — choose a keep-set, prune, optionally re-align.

Composes :mod:`moeharden.attack.keepsearch` (a keep-set from a file or an attribution method),
:mod:`moeharden.attack.prune` (the streaming physical prune) and, with ``--recover``,
:mod:`moeharden.attack.realign.pruned` (re-alignment of the pruned checkpoint on a task).
"""

from __future__ import annotations

from pathlib import Path

from moeharden.attack.prune import PruneResult, prune_checkpoint
from moeharden.errors import UsageError


def prune_command(*, ckpt: str, out: Path, experts_from: Path | None, method: str | None, task: str | None,
                  keep: int | None, max_shard_size: str, trust_remote_code: bool = False,
                  recover: bool = False, recover_mode: str = "full", recover_strategy: str = "entropy",
                  recover_budget: int = 64, recover_seed: int = 0) -> PruneResult:
    """What ``moeharden prune`` runs: a keep-set from KEEP.json, or from an attribution method;
    with ``recover``, the pruned checkpoint is then re-aligned on ``task`` (the attacker's
    re-alignment attack, :mod:`moeharden.attack.realign`) and written in its place.

    Raises:
        UsageError: neither or both ways of choosing experts; KeepSetError; CheckpointError.
    """
    from moeharden.attack.keepsearch import attributed_keep
    from moeharden.attack.realign.pruned import recover_pruned
    from moeharden.io.outputs import check_output_dir
    from moeharden.io.shards import parse_size
    from moeharden.model.checkpoint import resolve_checkpoint
    from moeharden.model.keepset import read_keep_file

    by_method = method is not None or keep is not None
    if experts_from is not None and by_method:
        raise UsageError("Give either --experts-from KEEP.json or --method/--task/--keep, not both.")
    if experts_from is None and not by_method:
        raise UsageError("Say which experts to keep: --experts-from KEEP.json, or --method M --task T --keep K.")
    if by_method and (method is None or task is None or keep is None):
        raise UsageError("--method, --task and --keep go together.")
    if recover and task is None:
        raise UsageError("--recover needs --task: the task whose labels the re-alignment attack buys.")
    check_output_dir(out)               # fail before any expensive work
    parse_size(max_shard_size)
    src = resolve_checkpoint(ckpt, trust_remote_code=trust_remote_code)
    if experts_from is not None:
        from moeharden.model.checkpoint import checkpoint_layout

        _, _, E, _, _, layers = checkpoint_layout(src)
        chosen = read_keep_file(experts_from, moe_layers=layers, num_experts=E)
    else:
        chosen = attributed_keep(src, method=method, task=task, keep=keep, trust_remote_code=trust_remote_code)
    result = prune_checkpoint(src, out, chosen, max_shard_size=max_shard_size, source_label=str(ckpt),
                              trust_remote_code=trust_remote_code)
    if recover:
        recover_pruned(Path(out), task=task, mode=recover_mode, strategy=recover_strategy, budget=recover_budget,
                       seed=recover_seed, max_shard_size=max_shard_size)
    return result
