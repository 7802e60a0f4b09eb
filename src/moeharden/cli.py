"""The command-line shell: parse options, call one library function, render what comes back.

No tensor code lives here, and torch is imported only inside commands that need it, so that
``moeharden --help`` starts fast. Every library error is mapped to a message and exit code by
:func:`_run` (see :mod:`moeharden.errors` for the table).
"""

from __future__ import annotations

import os
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import typer

from moeharden import __version__
from moeharden import console as ui
from moeharden.errors import EXIT_INTERRUPTED, EXIT_USAGE, MoehardenError, VerificationFailed

app = typer.Typer(
    name="moeharden",
    help="Audit and harden Mixture-of-Experts checkpoints against expert-pruning theft.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)

JsonOpt = typer.Option(False, "--json", help="Machine-readable JSON on stdout; no progress bars.")


def _version_callback(value: bool) -> None:
    if value:
        typer.echo(f"moeharden {__version__}")
        raise typer.Exit(0)


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version_callback, is_eager=True,
                                 help="Print the version and exit."),
    json_out: bool = typer.Option(False, "--json", help="Machine-readable JSON on stdout for every command."),
) -> None:
    """Audit and harden Mixture-of-Experts checkpoints against expert-pruning theft."""
    if json_out:
        ui.set_json_mode(True)


def _debug() -> bool:
    return os.environ.get("MOEHARDEN_DEBUG", "") not in ("", "0", "false", "False")


def _fail(title: str, message: str, hint: str | None, code: int) -> None:
    if ui.json_mode():
        ui.emit_json({"error": {"type": title, "message": message, "hint": hint, "exit_code": code}})
    text = f"[bold red]{title}:[/] {message}"
    if hint:
        text += f" [dim]Hint: {hint}[/]"
    ui.console.print(text, soft_wrap=True)
    raise typer.Exit(code)


def _run(fn: Callable[..., Any], /, **kwargs: Any) -> Any:
    """Call a library function and map its errors to messages and exit codes (the one handler)."""
    try:
        return fn(**kwargs)
    except VerificationFailed as err:
        if _debug():
            traceback.print_exc()
        for row in err.rows:
            ui.console.print(f"  [red]FAIL[/] {row}")
        _fail(err.title, err.message, err.hint, err.exit_code)
    except MoehardenError as err:
        if _debug():
            traceback.print_exc()
        _fail(err.title, err.message, err.hint, err.exit_code)
    except KeyboardInterrupt:
        ui.console.print("[yellow]Interrupted.[/] Outputs are written atomically; nothing partial was left.")
        raise typer.Exit(EXIT_INTERRUPTED) from None
    except typer.Exit:
        raise
    except Exception as err:  # a bug: still no traceback unless asked
        if _debug():
            traceback.print_exc()
        _fail("Internal error", f"{type(err).__name__}: {err}",
              "Re-run with MOEHARDEN_DEBUG=1 for the traceback and report it.", 70)
    return None


def _not_yet(command: str) -> None:
    ui.console.print(f"moeharden {command}: not available yet in this version ({__version__}).")
    raise typer.Exit(EXIT_USAGE)


def _json(flag: bool) -> None:
    if flag:
        ui.set_json_mode(True)


PushOpt = typer.Option(None, "--push-to-hub", metavar="REPO_ID",
                       help="Upload the output to this Hub repo (private unless --public; token from HF_TOKEN "
                            "or the hf login cache, never printed).")
PublicOpt = typer.Option(False, "--public", help="With --push-to-hub: create the repo public.")


def _push(out: Path, repo_id: str | None, what: str, public: bool) -> dict | None:
    """After a command has written ``out``: upload it when --push-to-hub was given."""
    if not repo_id:
        return None
    from moeharden.io.hub import push_output

    res = _run(push_output, out_dir=out, repo_id=repo_id, what=what, private=not public)
    info = res.to_dict() if hasattr(res, "to_dict") else {"repo_id": repo_id}
    if not ui.json_mode():
        ui.console.print(f"Pushed {out} to the Hub repo {repo_id} ({'public' if public else 'private'}).")
    return info


# --------------------------------------------------------------------------- prune
@app.command()
def prune(
    ckpt: str = typer.Argument(..., help="Checkpoint: a local directory or a Hub repo id."),
    out: Path = typer.Option(..., "--out", "-o", help="Output directory (written atomically)."),
    experts_from: Path | None = typer.Option(None, "--experts-from",
                                             help='KEEP.json: {"keep": {"<layer>": [expert ids]}}.'),
    method: str | None = typer.Option(None, "--method", help="Attribution method (needs --task, --keep)."),
    task: str | None = typer.Option(None, "--task", help="Task whose experts to keep (with --method)."),
    keep: int | None = typer.Option(None, "--keep", help="Experts to keep per MoE layer (with --method)."),
    max_shard_size: str = typer.Option("2GB", "--max-shard-size", help="Cap on each output shard."),
    recover: bool = typer.Option(False, "--recover", help="Re-align the pruned model on --task (the attack)."),
    recover_mode: str = typer.Option("full", "--recover-mode", help="full | router | lora | distill."),
    recover_strategy: str = typer.Option("entropy", "--recover-strategy", help="random | entropy | margin | kcenter."),
    recover_budget: int = typer.Option(64, "--recover-budget", help="Labels the attacker buys."),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code",
                                           help="Allow the checkpoint's own Python code (off by default)."),
    json_out: bool = JsonOpt,
) -> None:
    """The attacker's artifact: a physically smaller checkpoint keeping only some experts."""
    _json(json_out)
    from moeharden.attack.prune import prune_command

    result = _run(prune_command, ckpt=ckpt, out=out, experts_from=experts_from, method=method, task=task,
                  keep=keep, max_shard_size=max_shard_size, trust_remote_code=trust_remote_code, recover=recover,
                  recover_mode=recover_mode, recover_strategy=recover_strategy, recover_budget=recover_budget)
    if ui.json_mode():
        ui.emit_json(result.to_dict())
    else:
        ui.console.print(f"[green]Pruned[/] {result.source} → {result.out} "
                         f"({result.num_experts_before} → {result.num_experts_after} experts per MoE layer, "
                         f"{len(result.shards)} shard(s)).")


# --------------------------------------------------------------------------- demo
@app.command()
def demo(
    out: Path = typer.Option(Path("demo-out"), "--out", "-o", help="Output directory."),
    retrain: bool = typer.Option(False, "--retrain", help="Train the demo model again even if cached."),
    model_only: bool = typer.Option(False, "--model-only", help="Only build the demo model (no pipeline)."),
    json_out: bool = JsonOpt,
) -> None:
    """Build (or reuse) the embedded demo MoE, then scan → entangle → lock → verify → report."""
    _json(json_out)
    from moeharden.demo import run_demo

    result = _run(run_demo, out=out, retrain=retrain, model_only=model_only)
    if ui.json_mode():
        ui.emit_json(result.to_dict())
    else:
        ui.console.print(result.summary())


# --------------------------------------------------------------------------- later issues
@app.command()
def scan(
    ckpt: str = typer.Argument(..., help="Checkpoint: a local directory or a Hub repo id."),
    out: Path = typer.Option(..., "--out", "-o", help="Output directory (scan.json, report.md, report.html)."),
    task: list[str] | None = typer.Option(None, "--task", "-t",
                                          help="Preset name, task file, PRESET=local-file, or lm-eval:NAME. "
                                               "Repeatable. Default: the checkpoint's moeharden-tasks.yaml."),
    method: list[str] | None = typer.Option(None, "--method", "-m", help="Attribution method(s); default all."),
    keep: list[int] | None = typer.Option(None, "--keep", "-k", help="Keep-count(s); default E,3E/4,E/2,E/4,top-k."),
    ranking: str = typer.Option("per_layer", "--ranking", help="per_layer or global."),
    limit: int | None = typer.Option(None, "--limit", help="Seeded sample of N examples per task."),
    seed: int = typer.Option(0, "--seed"),
    random_seeds: int = typer.Option(3, "--random-seeds", help="Seeds of the random-keep control."),
    batch_size: int = typer.Option(32, "--batch-size"),
    recover: bool | None = typer.Option(None, "--recover/--no-recover",
                                        help="Run the re-alignment attack (default: on for small models)."),
    recover_budget: int | None = typer.Option(None, "--recover-budget", help="Label budget of the recovery attack."),
    lm_eval_include: list[Path] | None = typer.Option(None, "--lm-eval-include",
                                                      help="Directory of local lm-eval task YAMLs (repeatable)."),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code"),
    json_out: bool = JsonOpt,
) -> None:
    """Attribute experts per task, run the pruning sweep, and report how prunable the model is."""
    _json(json_out)
    from moeharden.audit.scan import ScanSettings
    from moeharden.audit.scan import scan as run_scan

    defaults = ScanSettings()
    settings = ScanSettings(
        methods=tuple(method) if method else defaults.methods, keeps=tuple(keep) if keep else None,
        ranking=ranking, limit=limit, seed=seed, random_seeds=random_seeds, batch_size=batch_size,
        recover=recover, recover_budget=recover_budget)
    result = _run(run_scan, ckpt=ckpt, out=out, tasks=task or None, settings=settings,
                  lm_eval_include=lm_eval_include or None, trust_remote_code=trust_remote_code)
    if ui.json_mode():
        ui.emit_json(result.to_dict())
        return
    from rich.table import Table

    table = Table(title="Best attacker per task (retained fraction of the full model)")
    for col in ("task", "full", "keep@25%", "retained", "method", "keep@50%", "retained", "method"):
        table.add_column(col)
    fulls = {t["name"]: t["full"] for t in result.data["tasks"]}
    for name, h in result.data["headline"].items():
        q, half = h["keep_25"], h["keep_50"]
        table.add_row(name, f"{fulls[name]:.3f}", str(q["keep"]), _f(q["retained"]), str(q["method"]),
                      str(half["keep"]), _f(half["retained"]), str(half["method"]))
    ui.console.print(table)
    ui.console.print(f"Report: {result.paths['html']}")


def _f(v: float | None) -> str:
    return "—" if v is None else f"{v:.3f}"


@app.command()
def entangle(
    ckpt: str = typer.Argument(..., help="Checkpoint: a local directory or a Hub repo id."),
    out: Path = typer.Option(..., "--out", "-o", help="Output checkpoint directory (written atomically)."),
    task: list[str] | None = typer.Option(None, "--task", "-t",
                                          help="Task(s) to protect; default: the checkpoint's own task file."),
    recipe: Path | None = typer.Option(None, "--recipe", help="Recipe YAML (flags below override it)."),
    steps: int | None = typer.Option(None, "--steps"),
    lr: float | None = typer.Option(None, "--lr"),
    batch_size: int | None = typer.Option(None, "--batch-size"),
    lambda_retain: float | None = typer.Option(None, "--lambda-retain"),
    lambda_prune: float | None = typer.Option(None, "--lambda-prune"),
    lambda_spread: float | None = typer.Option(None, "--lambda-spread"),
    recovery_term: bool | None = typer.Option(None, "--recovery-term/--no-recovery-term",
                                              help="TAR-style simulated-recovery term (slower)."),
    mixed_precision: str | None = typer.Option(None, "--mixed-precision", help="no | bf16 | fp16 (GPU)."),
    grad_accum: int | None = typer.Option(None, "--grad-accum"),
    checkpoint_every: int | None = typer.Option(None, "--checkpoint-every"),
    seed: int | None = typer.Option(None, "--seed"),
    resume: bool = typer.Option(False, "--resume", help="Continue from the last checkpoint of an interrupted run."),
    checkpoint_dir: Path | None = typer.Option(None, "--checkpoint-dir"),
    limit: int | None = typer.Option(None, "--limit", help="Seeded sample of N examples per task."),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code"),
    push_to_hub: str | None = PushOpt,
    public: bool = PublicOpt,
    json_out: bool = JsonOpt,
) -> None:
    """Retrain with an anti-pruning objective so that pruned sub-models fail sharply."""
    _json(json_out)
    from moeharden.defend.entangle import entangle as run_entangle

    overrides = {"steps": steps, "lr": lr, "batch_size": batch_size, "lambda_retain": lambda_retain,
                 "lambda_prune": lambda_prune, "lambda_spread": lambda_spread, "recovery_term": recovery_term,
                 "mixed_precision": mixed_precision, "grad_accum": grad_accum,
                 "checkpoint_every": checkpoint_every, "seed": seed}
    result = _run(run_entangle, ckpt=ckpt, out=out, tasks=task or None, recipe_path=recipe, overrides=overrides,
                  resume=resume, checkpoint_dir=checkpoint_dir, limit=limit, trust_remote_code=trust_remote_code)
    pushed = _push(out, push_to_hub, "entangle", public) if result.completed else None
    if ui.json_mode():
        ui.emit_json({**result.to_dict(), "pushed": pushed})
    else:
        last = ", ".join(f"{k}={v:.4f}" for k, v in result.last.items())
        ui.console.print(f"[green]Entangled[/] {ckpt} → {result.out} ({result.steps_done} steps, "
                         f"{result.seconds:.0f} s; last losses: {last}).")


@app.command()
def lock(
    ckpt: str = typer.Argument(..., help="Checkpoint to lock (local directory or Hub id), or `keygen`."),
    out: Path = typer.Option(..., "--out", "-o", help="Output directory (the locked release, or the key directory)."),
    policy: Path | None = typer.Option(None, "--policy", help="Policy YAML (see docs/policy.md)."),
    key: Path | None = typer.Option(None, "--key", help="Private key (KEYDIR/moeharden.key)."),
    keyless: bool = typer.Option(False, "--keyless", help="Sigstore keyless signing (needs network)."),
    push_to_hub: str | None = PushOpt,
    public: bool = PublicOpt,
    json_out: bool = JsonOpt,
) -> None:
    """Write a selective fine-tuning policy and a signed manifest into a release.

    `moeharden lock keygen --out KEYDIR` writes a key pair (moeharden.key, mode 0600; moeharden.pub).
    """
    _json(json_out)
    if ckpt == "keygen":
        from moeharden.defend.signing import keygen

        keys = _run(keygen, out=out)
        if ui.json_mode():
            ui.emit_json(keys)
        else:
            ui.console.print(f"Wrote {keys['private_key']} (keep it secret) and {keys['public_key']}.")
        return
    if policy is None:
        _fail("Usage error", "lock needs --policy P.yaml.", "See src/moeharden/data/policy-example.yaml.", EXIT_USAGE)
    from moeharden.defend.lock import lock_checkpoint

    result = _run(lock_checkpoint, ckpt=ckpt, policy=policy, key=key, out=out, keyless=keyless)
    pushed = _push(out, push_to_hub, "lock", public)
    if ui.json_mode():
        ui.emit_json({**result.to_dict(), "pushed": pushed})
    else:
        ui.console.print(f"[green]Locked[/] {ckpt} → {result.out}: policy in every shard, config.json and README.md; "
                         f"{result.tensors} tensors in {result.manifest}; signed ({result.signature}).")


@app.command()
def verify(
    ckpt: str = typer.Argument(..., help="Checkpoint to verify (local directory)."),
    pubkey: Path | None = typer.Option(None, "--pubkey", help="Public key (KEYDIR/moeharden.pub)."),
    manifest: Path | None = typer.Option(None, "--manifest",
                                         help="Manifest of the original release (default: CKPT's own)."),
    baseline: Path | None = typer.Option(None, "--baseline", help="Baseline scan.json: re-attack and check the gate."),
    out: Path | None = typer.Option(None, "--out", "-o", help="Output directory for verify.json and its report."),
    gate: Path | None = typer.Option(None, "--gate", help="Gate YAML (defaults: src/moeharden/data/gate-default.yaml)."),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code"),
    push_to_hub: str | None = PushOpt,
    public: bool = PublicOpt,
    json_out: bool = JsonOpt,
) -> None:
    """Check signature and tensor hashes (exit 4 on failure); with --baseline, re-attack the model and
    check the release gate (exit 1 when a row fails)."""
    _json(json_out)
    if baseline is None:
        if pubkey is None:
            _fail("Usage error", "verify needs --pubkey (integrity) and/or --baseline with --out (re-attack).", None,
                  EXIT_USAGE)
        _verify_integrity_only(Path(ckpt), pubkey, manifest)
        return
    if out is None:
        _fail("Usage error", "verify --baseline needs --out DIR for verify.json and its report.", None, EXIT_USAGE)
    from moeharden.audit.verify import describe_row, verify_attacks

    result = _run(verify_attacks, ckpt=ckpt, baseline=baseline, out=out, gate_path=gate, pubkey=pubkey,
                  manifest=manifest, trust_remote_code=trust_remote_code, raise_on_fail=False)
    if ui.json_mode():
        ui.emit_json(result.to_dict())
    else:
        from rich.table import Table

        table = Table(title=f"Release gate: {'PASSED' if result.passed else 'FAILED'}")
        for col in ("check", "task", "keep", "value", "threshold", "result"):
            table.add_column(col)
        for r in result.data["gate"]:
            table.add_row(r["check"], str(r.get("task") or "—"), str(r.get("keep") or "—"), str(r["value"]),
                          f"{r['op']} {r['threshold']}", "[green]pass[/]" if r["pass"] else "[red]FAIL[/]")
        ui.console.print(table)
        ui.console.print(f"verify.json and report: {out}")
    if result.passed:
        _push(out, push_to_hub, "verify", public)
    else:
        for r in result.failing():
            ui.console.print(f"  [red]FAIL[/] {describe_row(r)}")
        raise typer.Exit(1)


def _verify_integrity_only(ckpt: Path, pubkey: Path, manifest: Path | None) -> None:
    from moeharden.audit.integrity import verify_integrity
    from moeharden.errors import EXIT_INTEGRITY

    res = _run(verify_integrity, ckpt=ckpt, pubkey=pubkey, manifest=manifest, raise_on_fail=False)
    if ui.json_mode():
        ui.emit_json(res.to_dict())
    _render_integrity(res)
    if not res.ok:
        raise typer.Exit(EXIT_INTEGRITY)


def _render_integrity(res) -> None:
    if ui.json_mode():
        return
    sig = res.signature
    ui.console.print(f"signature ({sig.get('checked')}): " + ("[green]ok[/]" if sig.get("ok") else
                                                              f"[red]FAILED[/] {sig.get('error', '')}"))
    t = res.tensors
    ui.console.print(f"tensors checked: {t.get('checked', 0)}; changed {len(t.get('changed', []))}, "
                     f"missing {len(t.get('missing', []))}, extra {len(t.get('extra', []))}")
    for n in t.get("changed", [])[:20]:
        ui.console.print(f"  [red]changed[/] {n}")
    if res.derivation:
        ui.console.print("derivative of the release — kept original experts per layer:")
        for layer, d in sorted(res.derivation["layers"].items(), key=lambda x: int(x[0])):
            ui.console.print(f"  layer {layer}: kept {d['kept']}  removed {d['removed']}")
    for v in res.policy_violations:
        ui.console.print(f"  [red]policy[/] {v}")
    ui.console.print("[green]Intact: matches the signed release.[/]" if res.ok else
                     "[red]Integrity check failed.[/]")


@app.command()
def report(
    inputs: list[Path] = typer.Argument(..., help="scan.json (re-render), or BEFORE/scan.json AFTER/verify.json."),
    out: Path | None = typer.Option(None, "--out", "-o", help="Output directory (default: beside the JSON)."),
    push_to_hub: str | None = PushOpt,
    public: bool = PublicOpt,
    json_out: bool = JsonOpt,
) -> None:
    """Re-render reports (Markdown, HTML) from their JSON alone."""
    _json(json_out)
    if len(inputs) not in (1, 2):
        _fail("Usage error", "report takes one scan.json, or BEFORE/scan.json and AFTER/verify.json.", None,
              EXIT_USAGE)
    from moeharden.audit.report import render_before_after, rerender

    if len(inputs) == 1:
        md, html_path = _run(rerender, scan_json=inputs[0], out_dir=out)
    else:
        md, html_path = _run(render_before_after, before_json=inputs[0], verify_json=inputs[1],
                             out_dir=out or inputs[1].parent)
    pushed = _push(Path(html_path).parent, push_to_hub, "report", public)
    if ui.json_mode():
        ui.emit_json({"markdown": str(md), "html": str(html_path), "pushed": pushed})
    else:
        ui.console.print(f"Wrote {md} and {html_path}")


def main() -> None:
    """Console-script entry point."""
    if not _debug():   # dependencies' deprecation chatter is not for the user (MOEHARDEN_DEBUG=1 shows it)
        import warnings

        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=UserWarning)
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    try:
        app()
    except KeyboardInterrupt:  # raised outside a command body
        sys.exit(EXIT_INTERRUPTED)
