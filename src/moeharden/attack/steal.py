"""`moeharden prune`: the attacker's whole artifact — choose a keep-set, prune, optionally re-align.

Composes :mod:`moeharden.attack.keepsearch` (a keep-set from a file or an attribution method),
:mod:`moeharden.attack.prune` (the streaming physical prune) and, with ``--recover``,
:mod:`moeharden.attack.realign.pruned` (re-alignment of the pruned checkpoint on a task). Every
option is checked when its :class:`PruneSettings` is built, so a bad one fails before anything is
read or written (the re-alignment runs after the prune has been written).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from moeharden.attack.prune import PruneResult, prune_checkpoint
from moeharden.errors import UsageError


@dataclass(frozen=True)
class PruneSettings:
    """Everything ``prune`` needs besides the checkpoint; every option is checked when this is built.

    Attributes:
        out: output directory (replaced only under :func:`moeharden.io.outputs.check_output_dir`'s rules).
        experts_from: a KEEP.json (``{"keep": {"<layer>": [expert ids]}}``) — or else all three of
        method, task, keep: an attribution method, the task whose experts to keep, experts per MoE layer.
        max_shard_size: cap of each output shard (``"2GB"``, ``"40MB"`` or bytes).
        trust_remote_code: let transformers run the checkpoint's own code (attribution).
        recover: re-align the pruned checkpoint on ``task`` (the attack), with
        recover_mode, recover_strategy, recover_budget, recover_seed: of that run
            (:class:`moeharden.attack.realign.run.RecoverySettings`; checked even without ``recover``).
    Raises:
        UsageError: neither or both ways of choosing experts; an incomplete method/task/keep; an unknown
            method, recovery mode or strategy; ``keep`` or ``recover_budget`` below 1; ``recover``
            without ``task``; a zero shard size.
        InputError: an unreadable ``max_shard_size``.
    """

    out: Path
    experts_from: Path | None = None
    method: str | None = None
    task: str | None = None
    keep: int | None = None
    max_shard_size: str = "2GB"
    trust_remote_code: bool = False
    self_check: bool = True            # verify the family adapter on a tiny model first
    recover: bool = False
    recover_mode: str = "full"
    recover_strategy: str = "entropy"
    recover_budget: int = 64
    recover_seed: int = 0

    def __post_init__(self) -> None:
        from moeharden.attack.attribution import ALL_METHODS
        from moeharden.attack.realign.run import RecoverySettings
        from moeharden.io.shards import parse_size

        object.__setattr__(self, "out", Path(self.out))
        by_method = self.method is not None or self.keep is not None
        if self.experts_from is not None and by_method:
            raise UsageError("Give either --experts-from KEEP.json or --method/--task/--keep, not both.")
        if self.experts_from is None and not by_method:
            raise UsageError("Say which experts to keep: --experts-from KEEP.json, or --method M --task T --keep K.")
        if by_method and (self.method is None or self.task is None or self.keep is None):
            raise UsageError("--method, --task and --keep go together.")
        if self.method is not None and self.method not in ALL_METHODS:
            raise UsageError(f"Unknown method {self.method!r}.", hint=f"Choose from: {', '.join(ALL_METHODS)}.")
        if self.keep is not None and self.keep < 1:
            raise UsageError(f"--keep must be at least 1 (got {self.keep}).")
        if self.recover and self.task is None:
            raise UsageError("--recover needs --task: the task whose labels the re-alignment attack buys.")
        # the recovery run's own checks (mode, strategy, budget), now rather than after the prune is written
        RecoverySettings(mode=self.recover_mode, strategy=self.recover_strategy, budget=self.recover_budget,
                         seed=self.recover_seed)
        if parse_size(self.max_shard_size) < 1:
            raise UsageError(f"--max-shard-size must be positive (got {self.max_shard_size!r}).")


def prune_command(ckpt: str, settings: PruneSettings) -> PruneResult:
    """What ``moeharden prune`` runs: a keep-set from KEEP.json, or from an attribution method;
    with ``settings.recover``, the pruned checkpoint is then re-aligned on ``settings.task`` (the
    attacker's re-alignment attack, :mod:`moeharden.attack.realign`) and written in its place.

    Args:
        ckpt: checkpoint directory or Hub repo id.
        settings: the validated options (:class:`PruneSettings`).
    Returns:
        :class:`moeharden.attack.prune.PruneResult`.
    Raises:
        KeepSetError (a keep-set that does not fit the checkpoint), CheckpointError,
        UnsupportedModelError, InputError (``out`` not replaceable), TaskError.
    """
    from moeharden.attack.keepsearch import attack_tasks, attributed_keep
    from moeharden.attack.realign.pruned import recover_pruned
    from moeharden.io.outputs import check_output_dir
    from moeharden.model.checkpoint import resolve_checkpoint
    from moeharden.model.keepset import read_keep_file

    s = settings
    given = [p for p in (s.experts_from, s.task) if p is not None and Path(p).exists()]   # files named on the line
    check_output_dir(s.out, kind="prune", inputs=[ckpt, *given])       # fail before any expensive work
    src = resolve_checkpoint(ckpt, trust_remote_code=s.trust_remote_code)
    from moeharden.model.adapter_check import AdapterCheck
    from moeharden.model.checkpoint import load_config

    # the family self-check runs beside attribution and the prune; nothing is published before it passes
    with AdapterCheck(load_config(src, trust_remote_code=s.trust_remote_code), enabled=s.self_check) as check:
        if s.recover and s.experts_from is not None:
            attack_tasks(src, s.task, None)   # an unknown --task fails now, not after the prune is written
        if s.experts_from is not None:
            from moeharden.model.checkpoint import checkpoint_layout

            _, _, E, _, _, layers = checkpoint_layout(src)
            chosen = read_keep_file(s.experts_from, moe_layers=layers, num_experts=E)
        else:
            chosen = attributed_keep(src, method=s.method, task=s.task, keep=s.keep,
                                     trust_remote_code=s.trust_remote_code)
        result = prune_checkpoint(src, s.out, chosen, max_shard_size=s.max_shard_size, source_label=str(ckpt),
                                  trust_remote_code=s.trust_remote_code, self_check=check)
    if s.recover:
        recover_pruned(s.out, task=s.task, mode=s.recover_mode, strategy=s.recover_strategy,
                       budget=s.recover_budget, seed=s.recover_seed, max_shard_size=s.max_shard_size)
    return result
