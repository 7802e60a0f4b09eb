"""How the CLI renders library results for people (Rich tables and lines on stderr).

Every function takes a typed result and prints it; every user-supplied string (paths, task names,
tensor names, messages read from files) goes through :func:`~moeharden.cli.handler.esc`.
"""

from __future__ import annotations

from rich.table import Table

from moeharden import console as ui
from moeharden.cli.handler import esc
from moeharden.tasks.spec import TASK_FILE_NAME


def _f(v: float | None) -> str:
    return "—" if v is None else f"{v:.3f}"


def scan_headline(result) -> None:
    """The best attacker per task of a :class:`~moeharden.audit.scan.ScanResult`."""
    doc = result.data
    table = Table(title="Best attacker per task (retained fraction of the full model)")
    for col in ("task", "full", "keep@25%", "retained", "method", "keep@50%", "retained", "method"):
        table.add_column(col)
    for t in doc.tasks:
        h = doc.headline.get(t.name)
        if h is None:
            continue
        q, half = h.keep_25, h.keep_50
        table.add_row(esc(t.name), f"{t.full:.3f}", esc(q.keep), _f(q.retained), esc(q.method),
                      esc(half.keep), _f(half.retained), esc(half.method))
    ui.console.print(table)
    ui.console.print(f"Report: {esc(result.paths['html'])}")


def gate(result) -> None:
    """The gate table of a :class:`~moeharden.audit.verify.VerifyResult`, then its failing rows."""
    table = Table(title=f"Release gate: {'PASSED' if result.passed else 'FAILED'}")
    for col in ("check", "task", "keep", "value", "threshold", "result"):
        table.add_column(col)
    for r in result.data.gate:
        table.add_row(r.check, esc(r.task or "—"), esc(r.keep or "—"), esc(r.value), f"{r.op} {r.threshold}",
                      "[green]pass[/]" if r.passed else "[red]FAIL[/]")
    ui.console.print(table)
    ui.console.print(f"verify.json and report: {esc(result.out)}")
    for r in result.failing():
        ui.console.print(f"  [red]FAIL[/] {esc(r.describe())}")
    null = result.data.head_start_null
    if null is not None:
        from moeharden.audit.report import NULL_HEADER, null_rows_table

        table = Table(title=f"Expert head start at the physical limit ({null.seeds} shared curves per row; "
                            "the verdict above is unchanged)")
        for col in NULL_HEADER:
            table.add_column(col)
        for row in null_rows_table(result.data):
            table.add_row(*map(esc, row))
        ui.console.print(table)
        ui.console.print(f"A release at the limit would pass every row {null.all_pass_if_independent:.0%} of the "
                         "time (rows taken as independent).")


def integrity(res) -> None:
    """An :class:`~moeharden.audit.verdict.IntegrityReport`: signature, tensors, derivation, policy."""
    sig = res.signature
    if sig is not None:
        ui.console.print(f"signature ({esc(sig.checked)}): " + ("[green]ok[/]" if sig.ok else
                                                                 f"[red]FAILED[/] {esc(sig.error or '')}"))
    t = res.tensors
    if t is not None:
        ui.console.print(f"tensors checked: {t.checked}; changed {len(t.changed)}, missing {len(t.missing)}, "
                         f"extra {len(t.extra)}")
        for n in t.changed[:20]:
            ui.console.print(f"  [red]changed[/] {esc(n)}")
        for label, names in (("missing", t.missing), ("extra", t.extra)):   # a rename shows as both sides
            for n in names[:20]:
                ui.console.print(f"  [red]{label}[/] {esc(n)}")
        if t.unreadable:
            ui.console.print(f"  [red]unreadable[/] {esc(t.unreadable)}")
    if res.derivation:
        ui.console.print("derivative of the release — kept original experts per layer:")
        for layer, d in sorted(res.derivation.layers.items(), key=lambda x: int(x[0])):
            ui.console.print(f"  layer {esc(layer)}: kept {d.kept}  removed {d.removed}")
    for v in res.policy_violations:
        ui.console.print(f"  [red]policy[/] {esc(v)}")
    ui.console.print("[green]Intact: matches the signed release.[/]" if res.ok else
                     "[red]Integrity check failed.[/]")


def demo(result) -> None:
    """A :class:`~moeharden.demo.pipeline.DemoResult`: the model, its accuracy, the gate's verdict."""
    acc = ", ".join(f"{esc(k)} {v:.3f}" for k, v in result.training.get("accuracy", {}).items())
    how = ("reused from cache" if result.reused_cache
           else f"trained in {esc(result.training.get('train_seconds'))} s")
    lines = [f"[green]Demo model[/] ({how}, recipe {esc(result.recipe_hash)}) → {esc(result.model_dir)}",
             f"  held-out accuracy: {acc}", f"  tasks: {esc(result.model_dir / TASK_FILE_NAME)}"]
    p = result.pipeline
    if p is not None:
        verdict = "[green]PASSED[/]" if p.passed else "[red]FAILED[/]"
        lines.append(f"Demo pipeline finished in {p.seconds['total']:.0f} s; release gate {verdict}.")
        lines += [f"  [red]FAIL[/] {esc(r)}" for r in p.failing]
        lines.append(f"Before/after report: {esc(p.report)}")
    for line in lines:
        ui.console.print(line, soft_wrap=True)
