"""The attacker's and the publisher's commands: ``prune``, ``entangle``, ``keygen``, ``lock``, ``demo``.

Each parses its options into one settings object (:class:`~moeharden.attack.steal.PruneSettings`,
:class:`~moeharden.defend.entangle.command.EntangleSettings`, :class:`~moeharden.defend.lock.LockSettings`;
each checks every option when it is built), calls one library function with it through the one
handler (:func:`~moeharden.cli.handler.call`), and renders what comes back. ``lock keygen --out KEYDIR`` is
kept as the spelling of ``keygen`` under ``lock`` (Typer has no public way to let a group take a
positional checkpoint next to sub-commands), dispatched to the same :func:`keygen` command.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from moeharden import console as ui
from moeharden.cli import render
from moeharden.cli.handler import call, emit, esc, json_flag, push
from moeharden.cli.options import (
    CkptArg,
    JsonOpt,
    LimitOpt,
    OutOpt,
    PublicOpt,
    PushOpt,
    SkipSelfCheckOpt,
    TrustRemoteCodeOpt,
)


def prune(
    ckpt: CkptArg,
    out: OutOpt,
    experts_from: Annotated[Path | None, typer.Option(
        "--experts-from", help='KEEP.json: {"keep": {"<layer>": [expert ids]}}.')] = None,
    method: Annotated[str | None, typer.Option("--method", help="Attribution method (needs --task, --keep).")] = None,
    task: Annotated[str | None, typer.Option("--task", help="Task whose experts to keep (with --method).")] = None,
    keep: Annotated[int | None, typer.Option("--keep", help="Experts to keep per MoE layer (with --method).")] = None,
    max_shard_size: Annotated[str, typer.Option("--max-shard-size", help="Cap on each output shard.")] = "2GB",
    recover: Annotated[bool, typer.Option("--recover", help="Re-align the pruned model on --task (the attack).")] = False,
    recover_mode: Annotated[str, typer.Option("--recover-mode", help="full | router | lora | distill.")] = "full",
    recover_strategy: Annotated[str, typer.Option(
        "--recover-strategy", help="random | entropy | margin | kcenter.")] = "entropy",
    recover_budget: Annotated[int, typer.Option("--recover-budget", help="Labels the attacker buys.")] = 64,
    trust_remote_code: TrustRemoteCodeOpt = False,
    skip_self_check: SkipSelfCheckOpt = False,
    json_out: JsonOpt = False,
) -> None:
    """The attacker's artifact: a physically smaller checkpoint keeping only some experts."""
    json_flag(json_out)
    from moeharden.attack.steal import PruneSettings, prune_command

    settings = call(PruneSettings, out=out, experts_from=experts_from, method=method, task=task, keep=keep,
                    max_shard_size=max_shard_size, trust_remote_code=trust_remote_code, recover=recover,
                    self_check=not skip_self_check,
                    recover_mode=recover_mode, recover_strategy=recover_strategy, recover_budget=recover_budget)
    result = call(prune_command, ckpt, settings)
    if not emit(result):
        ui.console.print(f"[green]Pruned[/] {esc(result.source)} → {esc(result.out)} "
                         f"({result.num_experts_before} → {result.num_experts_after} experts per MoE layer, "
                         f"{len(result.shards)} shard(s)).")


def demo(
    out: Annotated[Path, typer.Option("--out", "-o", help="Output directory.")] = Path("demo-out"),
    retrain: Annotated[bool, typer.Option("--retrain", help="Train the demo model again even if cached.")] = False,
    model_only: Annotated[bool, typer.Option("--model-only", help="Only build the demo model (no pipeline).")] = False,
    quick: Annotated[bool, typer.Option("--quick", help="A small attack ladder and a 200-step entangle: the "
                                                        "whole pipeline in minutes (a smoke run, not a security verdict).")] = False,
    json_out: JsonOpt = False,
) -> None:
    """Build (or reuse) the embedded demo MoE, then scan → entangle → lock → verify → report."""
    json_flag(json_out)
    from moeharden.demo.pipeline import run_demo

    result = call(run_demo, out=out, retrain=retrain, model_only=model_only, quick=quick)
    if not emit(result):
        render.demo(result)


def entangle(
    ckpt: CkptArg,
    out: OutOpt,
    task: Annotated[list[str] | None, typer.Option(
        "--task", "-t", help="Task(s) to protect; default: the checkpoint's own task file.")] = None,
    recipe: Annotated[Path | None, typer.Option("--recipe", help="Recipe YAML (flags below override it).")] = None,
    steps: Annotated[int | None, typer.Option("--steps")] = None,
    lr: Annotated[float | None, typer.Option("--lr")] = None,
    batch_size: Annotated[int | None, typer.Option("--batch-size")] = None,
    lambda_retain: Annotated[float | None, typer.Option("--lambda-retain")] = None,
    lambda_prune: Annotated[float | None, typer.Option("--lambda-prune")] = None,
    lambda_spread: Annotated[float | None, typer.Option("--lambda-spread")] = None,
    recovery_term: Annotated[bool | None, typer.Option(
        "--recovery-term/--no-recovery-term", help="TAR-style simulated-recovery term (slower).")] = None,
    mixed_precision: Annotated[str | None, typer.Option("--mixed-precision", help="no | bf16 | fp16 (GPU).")] = None,
    grad_accum: Annotated[int | None, typer.Option("--grad-accum")] = None,
    checkpoint_every: Annotated[int | None, typer.Option("--checkpoint-every")] = None,
    seed: Annotated[int | None, typer.Option("--seed")] = None,
    resume: Annotated[bool, typer.Option(
        "--resume", help="Continue from the last checkpoint of an interrupted run.")] = False,
    checkpoint_dir: Annotated[Path | None, typer.Option("--checkpoint-dir")] = None,
    limit: LimitOpt = None,
    trust_remote_code: TrustRemoteCodeOpt = False,
    skip_self_check: SkipSelfCheckOpt = False,
    push_to_hub: PushOpt = None,
    public: PublicOpt = False,
    json_out: JsonOpt = False,
) -> None:
    """Retrain with an anti-pruning objective so that pruned sub-models fail sharply."""
    json_flag(json_out)
    from moeharden.defend.entangle.command import EntangleSettings
    from moeharden.defend.entangle.command import entangle as run_entangle

    # recipe overrides stay None unless given on the command line (then the recipe's value stands)
    settings = call(EntangleSettings, out=out, tasks=task or None, recipe_path=recipe, steps=steps, lr=lr,
                    batch_size=batch_size, lambda_retain=lambda_retain, lambda_prune=lambda_prune,
                    lambda_spread=lambda_spread, recovery_term=recovery_term, mixed_precision=mixed_precision,
                    grad_accum=grad_accum, checkpoint_every=checkpoint_every, seed=seed, resume=resume,
                    checkpoint_dir=checkpoint_dir, limit=limit, trust_remote_code=trust_remote_code,
                    self_check=not skip_self_check)
    result = call(run_entangle, ckpt, settings)
    pushed = push(out, push_to_hub, "entangle", public) if result.completed else None
    if not emit({**result.to_dict(), "pushed": pushed}):
        last = ", ".join(f"{k}={v:.4f}" for k, v in result.last.items())
        ui.console.print(f"[green]Entangled[/] {esc(ckpt)} → {esc(result.out)} ({result.steps_done} steps, "
                         f"{result.seconds:.0f} s; last losses: {esc(last)}).")


def keygen(
    out: Annotated[Path, typer.Option("--out", "-o", help="Key directory (moeharden.key, moeharden.pub).")],
    json_out: JsonOpt = False,
) -> None:
    """Write a signing key pair: moeharden.key (mode 0600, keep it secret) and moeharden.pub."""
    json_flag(json_out)
    from moeharden.defend.signing import keygen as write_keys

    keys = call(write_keys, out=out)
    if not emit(keys):
        ui.console.print(f"Wrote {esc(keys['private_key'])} (keep it secret) and {esc(keys['public_key'])}.")


def lock(
    ckpt: Annotated[str, typer.Argument(help="Checkpoint to lock (local directory or Hub id); `keygen` "
                                             "writes a key pair instead (same as `moeharden keygen`).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output directory (the locked release, or the key "
                                                          "directory).")],
    policy: Annotated[Path | None, typer.Option("--policy", help="Policy YAML (see docs/policy.md).")] = None,
    key: Annotated[Path | None, typer.Option("--key", help="Private key (KEYDIR/moeharden.key).")] = None,
    keyless: Annotated[bool, typer.Option("--keyless", help="Sigstore keyless signing (needs network).")] = False,
    trust_remote_code: TrustRemoteCodeOpt = False,
    skip_self_check: SkipSelfCheckOpt = False,
    push_to_hub: PushOpt = None,
    public: PublicOpt = False,
    json_out: JsonOpt = False,
) -> None:
    """Write a selective fine-tuning policy and a signed manifest into a release.

    `moeharden lock keygen --out KEYDIR` (or `moeharden keygen --out KEYDIR`) writes a key pair.
    """
    if ckpt == "keygen":
        keygen(out=out, json_out=json_out)
        return
    json_flag(json_out)
    from moeharden.defend.lock import LockSettings, lock_checkpoint

    settings = call(LockSettings, out=out, policy=policy, key=key, keyless=keyless,
                    trust_remote_code=trust_remote_code, self_check=not skip_self_check)
    result = call(lock_checkpoint, ckpt, settings)
    pushed = push(out, push_to_hub, "lock", public)
    if not emit({**result.to_dict(), "pushed": pushed}):
        ui.console.print(f"[green]Locked[/] {esc(ckpt)} → {esc(result.out)}: policy in every shard, config.json and "
                         f"README.md; {result.tensors} tensors in {esc(result.manifest)}; signed "
                         f"({esc(result.signature)}).")
