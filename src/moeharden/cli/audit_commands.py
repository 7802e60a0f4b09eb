"""The audit commands: ``scan``, ``verify``, ``report`` and ``schema``.

Each parses its options into one settings object, calls one library function through the one
handler (:func:`~moeharden.cli.handler.call`), and renders what comes back.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from moeharden import console as ui
from moeharden.cli import render
from moeharden.cli.handler import call, emit, esc, fail, json_flag, push
from moeharden.cli.options import (
    CkptArg,
    JsonOpt,
    LimitOpt,
    PubkeyOpt,
    PublicOpt,
    PushOpt,
    TaskOpt,
    TrustRemoteCodeOpt,
)
from moeharden.errors import EXIT_INTEGRITY, EXIT_USAGE, EXIT_VERIFY_FAILED


def scan(
    ckpt: CkptArg,
    out: Annotated[Path, typer.Option("--out", "-o", help="Output directory (scan.json, report.md, report.html).")],
    task: TaskOpt = None,
    method: Annotated[list[str] | None, typer.Option("--method", "-m", help="Attribution method(s); default all.")] = None,
    keep: Annotated[list[int] | None, typer.Option("--keep", "-k",
                                                   help="Keep-count(s); default E,3E/4,E/2,E/4,top-k.")] = None,
    ranking: Annotated[str, typer.Option("--ranking", help="per_layer or global.")] = "per_layer",
    limit: LimitOpt = None,
    seed: Annotated[int, typer.Option("--seed")] = 0,
    random_seeds: Annotated[int, typer.Option("--random-seeds", help="Seeds of the random-keep control.")] = 3,
    batch_size: Annotated[int, typer.Option("--batch-size")] = 32,
    max_batch_tokens: Annotated[int | None, typer.Option(
        "--max-batch-tokens", help="Padded tokens per forward of the attribution pass (bounds its memory; "
                                   "default: 2048, more on a model large enough that one forward's expert "
                                   "activations stay under 5% of its weights, at most 16384).")] = None,
    recover: Annotated[bool, typer.Option("--recover/--no-recover",
                                          help="Also run the fixed-hyper-parameter re-alignment suite (every mode "
                                               "× strategy at one budget).")] = False,
    ladder: Annotated[bool | None, typer.Option(
        "--ladder/--no-ladder", help="The adaptive re-alignment attack on the budget ladder with its `shared` and "
                                     "`scratch` references (default: on for models ≤ 100M parameters).")] = None,
    workers: Annotated[int, typer.Option("--workers", help="Processes for the ladder's curves.")] = 1,
    recover_budget: Annotated[int | None, typer.Option("--recover-budget",
                                                       help="Label budget of the recovery attack.")] = None,
    lm_eval_include: Annotated[list[Path] | None, typer.Option(
        "--lm-eval-include", help="Directory of local lm-eval task YAMLs (repeatable).")] = None,
    trust_remote_code: TrustRemoteCodeOpt = False,
    json_out: JsonOpt = False,
) -> None:
    """Attribute experts per task, run the pruning sweep, and report how prunable the model is."""
    json_flag(json_out)
    from moeharden.audit.scan import ScanSettings
    from moeharden.audit.scan import scan as run_scan

    settings = ScanSettings(
        **({"methods": tuple(method)} if method else {}), keeps=tuple(keep) if keep else None,
        ranking=ranking, limit=limit, seed=seed, random_seeds=random_seeds, batch_size=batch_size,
        **({} if max_batch_tokens is None else {"max_batch_tokens": max_batch_tokens}),
        recover=recover, recover_budget=recover_budget, ladder=ladder, workers=workers)
    result = call(run_scan, ckpt=ckpt, out=out, tasks=task or None, settings=settings,
                  lm_eval_include=lm_eval_include or None, trust_remote_code=trust_remote_code)
    if not emit(result):
        render.scan_headline(result)


def verify(
    ckpt: Annotated[str, typer.Argument(help="Checkpoint to verify (local directory).")],
    pubkey: PubkeyOpt = None,
    manifest: Annotated[Path | None, typer.Option(
        "--manifest", help="Manifest of the original release (default: CKPT's own).")] = None,
    baseline: Annotated[Path | None, typer.Option(
        "--baseline", help="Baseline scan.json: re-attack and check the gate.")] = None,
    out: Annotated[Path | None, typer.Option("--out", "-o",
                                             help="Output directory for verify.json and its report.")] = None,
    gate: Annotated[Path | None, typer.Option(
        "--gate", help="Gate YAML (defaults: src/moeharden/data/gate-default.yaml).")] = None,
    trust_remote_code: TrustRemoteCodeOpt = False,
    push_to_hub: PushOpt = None,
    public: PublicOpt = False,
    workers: Annotated[int, typer.Option("--workers", help="Processes for the ladder's curves.")] = 1,
    task: Annotated[list[str] | None, typer.Option(
        "--task", "-t", help="The baseline's tasks (as given to scan), when CKPT does not carry them in its "
                             "moeharden-tasks.yaml and they came from a task file. Repeatable.")] = None,
    null_seeds: Annotated[int, typer.Option(
        "--null-seeds", help="Also run N shared curves per task and attack and report how often each expert-head-"
                             "start row fails a release at the physical limit (its pruned copy no better than "
                             "fresh experts); at least twice the plan's seeds, 9 for the default plan. The "
                             "verdict is unchanged.")] = 0,
    json_out: JsonOpt = False,
) -> None:
    """Check signature and tensor hashes (exit 4 on failure); with --baseline, re-attack the model and
    check the release gate (exit 1 when a row fails)."""
    json_flag(json_out)
    from moeharden.audit.verdict import IntegrityReport
    from moeharden.audit.verify import VerifySettings
    from moeharden.audit.verify import verify as run_verify

    settings = VerifySettings(baseline=baseline, out=out, gate=gate, pubkey=pubkey, manifest=manifest,
                              workers=workers, trust_remote_code=trust_remote_code, tasks=tuple(task or ()),
                              null_seeds=null_seeds)
    result = call(run_verify, ckpt, settings)
    if isinstance(result, IntegrityReport):
        if not emit(result.to_json()):
            render.integrity(result)
        if not result.ok:
            raise typer.Exit(EXIT_INTEGRITY)
        return
    if not emit(result):
        render.gate(result)
    if not result.passed:
        raise typer.Exit(EXIT_VERIFY_FAILED)
    push(result.out, push_to_hub, "verify", public)


def report(
    inputs: Annotated[list[Path], typer.Argument(help="scan.json (re-render), or BEFORE/scan.json AFTER/verify.json.")],
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Output directory (default: beside the JSON).")] = None,
    push_to_hub: PushOpt = None,
    public: PublicOpt = False,
    json_out: JsonOpt = False,
) -> None:
    """Re-render reports (Markdown, HTML) from their JSON alone.

    Writes report.md and report.html into --out (created if missing) or beside the JSON. An existing
    report file is replaced only if moeharden wrote it there (e.g. a scan or verify output); a file of
    yours or a symbolic link at those paths, or an --out that is a link, is refused (exit 3).
    """
    json_flag(json_out)
    from moeharden.audit.report import render_reports

    md, html_path = call(render_reports, inputs, out)
    pushed = push(Path(html_path).parent, push_to_hub, "report", public)
    if not emit({"markdown": str(md), "html": str(html_path), "pushed": pushed}):
        ui.console.print(f"Wrote {esc(md)} and {esc(html_path)}")


def schema(
    name: Annotated[str | None, typer.Argument(
        help="Document: scan, verify, gate, integrity, prune, entangle or manifest.")] = None,
    markdown: Annotated[bool, typer.Option(
        "--markdown", help="Print docs/report-fields.md (every document's fields) instead.")] = False,
) -> None:
    """Print the JSON Schema of a report document (or, with --markdown, the field reference)."""
    from moeharden.audit.schemas import document_schema, render_markdown

    if markdown:
        typer.echo(render_markdown(), nl=False)
        return
    if name is None:
        fail("Usage error", "schema needs a document NAME, or --markdown.",
             "Names: scan, verify, gate, integrity, prune, entangle, manifest.", EXIT_USAGE)
    ui.emit_json(call(document_schema, name))
