"""Render reports (Markdown and self-contained HTML) from report JSON alone.

``scan.json`` and ``verify.json`` (:class:`~moeharden.audit.documents.ScanDocument`,
:class:`~moeharden.audit.verdict.VerifyDocument`) are the source of truth; this module only reads them.
HTML embeds its plots as inline PNG (base64), so the file can be mailed or archived as is.
"""

from __future__ import annotations

import html
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from moeharden.audit.documents import ScanDocument, load_document
from moeharden.audit.report_format import dicts, fmt, html_table, img, md_table, page
from moeharden.audit.verdict import VerifyDocument

REPORT_NAMES = ("report.md", "report.html")

def headline_rows(scan: ScanDocument) -> list[list[Any]]:
    """Per task: the best attacker's retained fraction at 25% and 50% of experts kept."""
    rows = []
    for t in scan.tasks:
        h = scan.headline.get(t.name)
        q, half = (h.keep_25, h.keep_50) if h is not None else (None, None)
        rows.append([t.name, t.metric, t.full, t.chance]
                    + [getattr(p, f, None) for p in (q, half) for f in ("keep", "retained", "method")])
    return rows


HEADLINE_HEADER = ["task", "metric", "full", "chance", "keep@25%", "retained", "best method",
                   "keep@50%", "retained", "best method"]


def sweep_table(scan: ScanDocument, task: str) -> tuple[list[str], list[list[Any]]]:
    """Pivot of one task's sweep: rows = methods, columns = keep-counts (retained fraction)."""
    rows = [r for r in scan.sweep if r.task == task]
    keeps = sorted({r.keep for r in rows}, reverse=True)
    methods = sorted({r.method for r in rows}, key=lambda m: (m == "random", m))
    table = []
    for m in methods:
        cells = {r.keep: r.retained for r in rows if r.method == m}
        table.append([m] + [cells.get(k) for k in keeps])
    return ["method \\ keep"] + [str(k) for k in keeps], table


def _target(scan: ScanDocument, full: float | None) -> float | None:
    """The recovery target line of a task's curves: ``target_fraction`` of its full metric."""
    if full is None or scan.recovery_settings is None:
        return None
    return scan.recovery_settings.target_fraction * full


HEADSTART_HEADER = ["task", "attack", "target", "labels: pruned", "shared", "scratch", "expert head start (labels)",
                    "theft head start (labels)", "area: pruned", "shared", "scratch", "expert head start (area)",
                    "theft head start (area)"]


def headstart_rows(doc: ScanDocument) -> list[list[Any]]:
    """One row per (task, attack) of the ladder summary: labels to recover, areas and both head starts."""
    out: list[list[Any]] = []
    if doc.ladder is None:
        return out
    for task, s in doc.ladder.summary.items():
        for attack, a in s.attacks.items():
            refs = a.references
            lab = [refs[r].labels if r in refs else None for r in ("pruned", "shared", "scratch")]
            area = [refs[r].area if r in refs else None for r in ("pruned", "shared", "scratch")]
            lab = [f">{a.top}" if r in refs and v is None else v for r, v in zip(("pruned", "shared", "scratch"), lab,
                                                                                  strict=True)]
            ehs, ths = a.expert_head_start, a.theft_head_start
            out.append([task, attack, s.target, *lab, None if ehs is None else ehs.labels,
                        None if ths is None else ths.labels, *area, None if ehs is None else ehs.area,
                        None if ths is None else ths.area])
    return out


def ladder_parts(doc: ScanDocument, task: str, label: str = "") -> list[str]:
    """The ladder's learning-curve plots of one task (labels and distill), as HTML images."""
    from moeharden.audit import plots

    if doc.ladder is None or task not in doc.ladder.summary:
        return []
    t = doc.task(task)
    curves = [c.to_json() for c in doc.ladder.curves if c.task == task]
    out = []
    for attack in doc.ladder.summary[task].attacks:
        png = plots.ladder_curves(task, attack, curves, target=doc.ladder.summary[task].target,
                                  full=t.full if t else None,
                                  title=f"{task}{f' ({label})' if label else ''}: {attack} ladder")
        out.append(img(png, f"{task} {attack} ladder {label}"))
    return out


def headstart_md(doc: ScanDocument, heading: str) -> list[str]:
    rows = headstart_rows(doc)
    if not rows:
        return []
    return [f"## {heading}", "", "Labels (distill: prompts) to reach the target, and mean metric over the ladder, "
            "for the stolen pruned copy and the `shared` (non-expert weights, fresh experts) and `scratch` "
            "references; `>N`: not reached on a ladder that stops at N.", "",
            md_table(HEADSTART_HEADER, rows), ""]


def headstart_html(doc: ScanDocument, heading: str) -> list[str]:
    rows = headstart_rows(doc)
    return [f"<h2>{html.escape(heading)}</h2>", html_table(HEADSTART_HEADER, rows)] if rows else []


NULL_HEADER = ["task", "attack", "trials", "row fails at the limit", "area: median / max",
               "labels ratio: median / share below", "measured area", "beyond the null"]


def null_rows_table(verify) -> list[list[str]]:
    """The ``head_start_null`` section as table rows (empty without ``--null-seeds``)."""
    null = verify.head_start_null
    if null is None:
        return []
    return [[r.task, r.attack, str(r.trials), f"{r.fail_rate:.0%}", f"{r.area_median:+.3f} / {r.area_max:+.3f}",
             f"{'—' if r.ratio_median is None else f'{r.ratio_median:.2f}'} / {r.ratio_below:.0%}",
             "—" if r.measured_area is None else f"{r.measured_area:+.3f}",
             "—" if r.beyond_null is None else ("yes: a real head start" if r.beyond_null else "no")]
            for r in null.rows]


def null_text(verify) -> str:
    null = verify.head_start_null
    return (f"The expert-head-start rows at the physical limit: {null.seeds} `shared` curves per task and attack "
            "play both the pruned copy and the reference, split every way, and the gate's own row is computed on "
            "each split. \"Row fails at the limit\" is how often the row fails a release whose pruned copy is no "
            "better a start than fresh experts; a measured area beyond every split's is a real head start. The "
            "gate's verdict is unchanged. If the rows were independent, a release at the limit would pass all of "
            f"them {null.all_pass_if_independent:.0%} of the time.")


def render_scan(scan: ScanDocument, out_dir: Path) -> tuple[Path, Path]:
    """Write ``report.md`` and ``report.html`` for a scan into ``out_dir``; returns both paths.

    Raises:
        InputError: one of them may not be written there (:func:`_write_reports`).
    """
    from moeharden.audit import plots

    out_dir = Path(out_dir)
    _check_reports(out_dir)                 # before the plots: a refusal costs nothing
    model = scan.model
    E = model.num_experts
    title = f"moeharden scan — {model.name or model.path}"
    meta = (f"family {model.family} · {E} experts · top-{model.top_k} · "
            f"moeharden {scan.tool.version} · {scan.created}")
    md = [f"# {title}", "", f"_{meta}_", "", "## Headline", "",
          "If someone steals this checkpoint and keeps only the experts a task uses, this much of the "
          "task survives (best attacker per task; retained = pruned ÷ full metric):", "",
          md_table(HEADLINE_HEADER, headline_rows(scan)), ""]
    parts = [f"<h1>{html.escape(title)}</h1><p class='meta'>{html.escape(meta)}</p>", "<h2>Headline</h2>",
             "<p>If someone steals this checkpoint and keeps only the experts a task uses, this much of "
             "the task survives (best attacker per task; retained = pruned ÷ full metric).</p>",
             html_table(HEADLINE_HEADER, headline_rows(scan))]
    for t in scan.tasks:
        name = t.name
        rows = [r for r in scan.sweep if r.task == name]
        header, table = sweep_table(scan, name)
        md += [f"## Task `{name}`", "", f"metric {t.metric}: full {fmt(t.full)}, chance {fmt(t.chance)}",
               "", "Retained fraction by method and experts kept per layer:", "", md_table(header, table), ""]
        parts += [f"<h2>Task <code>{html.escape(name)}</code></h2>",
                  f"<p>metric {html.escape(t.metric)}: full {fmt(t.full)}, chance {fmt(t.chance)}</p>",
                  html_table(header, table)]
        if rows:
            parts.append(img(plots.retained_curves(name, E, dicts(rows)), f"{name} retained vs keep"))
        mats = {m: per_task[name] for m, per_task in scan.attribution.items() if name in per_task}
        if mats and model.moe_layers:
            parts.append(img(plots.attribution_heatmaps(name, model.moe_layers, mats), f"{name} attribution heatmaps"))
        rec = [r for r in scan.recovery or [] if r.task == name]
        for keep in sorted({r.keep for r in rec}):
            sub = dicts(r for r in rec if r.keep == keep)
            parts.append(img(plots.recovery_curves(name, keep, sub, full=t.full), f"{name} recovery keep {keep}"))
        parts += ladder_parts(scan, name)
    md += headstart_md(scan, "Head starts (adaptive attack on the ladder)")
    parts += headstart_html(scan, "Head starts (adaptive attack on the ladder)")
    if scan.labels_to_recover:
        ltr = scan.labels_to_recover
        strategies = sorted({s for v in ltr.values() for s in v})
        lrows = [[task] + [v.get(s) for s in strategies] for task, v in ltr.items()]
        md += ["## Labels to recover", "", md_table(["task"] + strategies, lrows), ""]
        parts += ["<h2>Labels to recover</h2>", html_table(["task"] + strategies, lrows)]
    if scan.timings:
        trows = [[k, v] for k, v in scan.timings.items()]
        md += ["## Timings (s)", "", md_table(["step", "seconds"], trows), ""]
        parts += ["<h2>Timings (s)</h2>", html_table(["step", "seconds"], trows)]
    return _write_reports(out_dir, "\n".join(md) + "\n", page(title, parts))


def _check_reports(out_dir: Path) -> None:
    from moeharden.io.outputs import check_files_writable

    if out_dir.is_dir():
        check_files_writable(out_dir, REPORT_NAMES)


def _write_reports(out_dir: Path, md: str, html_text: str) -> tuple[Path, Path]:
    """Write both reports into ``out_dir``, each atomically: never over a file moeharden did not write
    there, never through a link (:func:`moeharden.io.outputs.write_files`).

    Raises:
        InputError: ``report.md`` or ``report.html`` in ``out_dir`` is a link, not a regular file, or
            a file moeharden did not write.
    """
    from moeharden.io.outputs import write_files

    md_path, html_path = write_files(out_dir, dict(zip(REPORT_NAMES, (md, html_text), strict=True)))
    return md_path, html_path


def rerender(scan_json: Path, out_dir: Path | None = None) -> tuple[Path, Path]:
    """Re-render a scan's reports from its JSON alone (``moeharden report DIR/scan.json``).

    Raises:
        InputError: the file is missing or not a valid scan document.
    """
    scan = load_document(scan_json, ScanDocument)
    return render_scan(scan, out_dir or Path(scan_json).parent)


# --------------------------------------------------------------------------- before / after
GATE_HEADER = ["check", "task", "keep", "attack", "value", "95% interval", "threshold", "area (≤)", "result"]


def gate_table_rows(verify: VerifyDocument) -> list[list[Any]]:
    def iv(r):
        return None if r.lo is None and r.hi is None else f"[{fmt(r.lo)}, {fmt(r.hi)}]"

    def area(r):
        return None if r.area is None else f"{fmt(r.area)} (≤ {fmt(r.area_threshold)})"

    return [[r.check, r.task or "—", r.keep, r.attack, r.value, iv(r), f"{r.op} {r.threshold}", area(r),
             r.status.upper() if not r.passed or r.status == "inconclusive" else "pass"] for r in verify.gate]


def model_card_snippet(before: ScanDocument, verify: VerifyDocument) -> str:
    """A Markdown section a publisher can paste into the model card."""
    after = verify.attack
    lines = ["## Expert-pruning robustness (moeharden)", "",
             f"Checked with moeharden {verify.tool.version} on {verify.created[:10]}: "
             f"gate **{'PASSED' if verify.passed else 'FAILED'}**.", "",
             "| task | full (baseline → hardened) | best attack retained @50% (baseline → hardened) |",
             "|---|---|---|"]
    for t in after.tasks:
        b = before.task(t.name)
        bh, ah = before.headline.get(t.name), after.headline.get(t.name)
        lines.append(f"| {t.name} | {fmt(b.full if b else None)} → {fmt(t.full)} | "
                     f"{fmt(bh.keep_50.retained if bh else None)} → {fmt(ah.keep_50.retained if ah else None)} |")
    return "\n".join(lines) + "\n"


def _verify_task_parts(before: ScanDocument, after: ScanDocument, name: str) -> list[str]:
    """The HTML of one task in the before/after report: curves side by side, recovery, heatmaps."""
    from moeharden.audit import plots

    E = after.model.num_experts
    parts = [f"<h2>Task <code>{html.escape(name)}</code></h2><div class='grid'>"]
    for label, doc in (("before", before), ("after", after)):
        rows = [r for r in doc.sweep if r.task == name]
        if rows:
            parts.append(img(plots.retained_curves(name, E, dicts(rows), title=f"{name}: {label}"),
                              f"{name} retained {label}"))
    parts.append("</div><div class='grid'>")
    for label, doc in (("before", before), ("after", after)):
        rec = [r for r in doc.recovery or [] if r.task == name]
        t = doc.task(name)
        full = t.full if t else None
        for keep in sorted({r.keep for r in rec}):
            sub = dicts(r for r in rec if r.keep == keep and r.mode in ("full", "distill"))
            parts.append(img(plots.recovery_curves(f"{name} ({label})", keep, sub, full=full,
                                                    target=_target(doc, full)), f"{name} recovery {label}"))
    parts.append("</div><div class='grid'>")
    for label, doc in (("before", before), ("after", after)):
        parts += ladder_parts(doc, name, label)
    parts.append("</div>")
    mats = {m: per[name] for m, per in after.attribution.items() if name in per}
    if mats and after.model.moe_layers:
        parts.append(img(plots.attribution_heatmaps(f"{name} (after)", after.model.moe_layers, mats),
                          f"{name} heatmaps after"))
    return parts


def render_verify(before: ScanDocument, verify: VerifyDocument, out_dir: Path) -> tuple[Path, Path]:
    """Before/after report: gate table, retained-vs-keep side by side, recovery curves, heatmaps.

    Raises:
        InputError: ``report.md`` or ``report.html`` may not be written into ``out_dir`` (:func:`_write_reports`).
    """
    out_dir = Path(out_dir)
    _check_reports(out_dir)
    after = verify.attack
    verdict = "PASSED" if verify.passed else "FAILED"
    title = f"moeharden verify — {after.model.name}: gate {verdict}"
    md = [f"# {title}", "", f"_moeharden {verify.tool.version} · {verify.created}_", "",
          "## Gate", "", md_table(GATE_HEADER, gate_table_rows(verify)), ""]
    parts = [f"<h1>{html.escape(title)}</h1>",
             f"<p class='meta'>moeharden {html.escape(verify.tool.version)} · {html.escape(verify.created)}</p>",
             "<h2>Gate</h2>", html_table(GATE_HEADER, gate_table_rows(verify))]
    if verify.integrity is not None:
        md += ["## Manifest", "", f"integrity ok: {verify.integrity.ok}", ""]
        parts.append(f"<h2>Manifest</h2><p>integrity ok: <b>{verify.integrity.ok}</b></p>")
    md += ["## Headline (before → after)", "", "Before:", "", md_table(HEADLINE_HEADER, headline_rows(before)), "",
           "After:", "", md_table(HEADLINE_HEADER, headline_rows(after)), ""]
    parts += ["<h2>Headline</h2><h3>Before</h3>", html_table(HEADLINE_HEADER, headline_rows(before)),
              "<h3>After</h3>", html_table(HEADLINE_HEADER, headline_rows(after))]
    md += headstart_md(before, "Head starts before (baseline)") + headstart_md(after, "Head starts after (hardened)")
    parts += headstart_html(before, "Head starts before (baseline)") + headstart_html(after, "Head starts after (hardened)")
    if verify.head_start_null is not None:
        md += ["## Expert head start at the physical limit", "", null_text(verify), "",
               md_table(NULL_HEADER, null_rows_table(verify)), ""]
        parts += ["<h2>Expert head start at the physical limit</h2>", f"<p>{html.escape(null_text(verify))}</p>",
                  html_table(NULL_HEADER, null_rows_table(verify))]
    for t in after.tasks:
        parts += _verify_task_parts(before, after, t.name)
        for label, doc in (("before", before), ("after", after)):
            header, table = sweep_table(doc, t.name)
            md += [f"### {t.name} — retained by method and keep ({label})", "", md_table(header, table), ""]
    snippet = model_card_snippet(before, verify)
    md += ["## Model-card snippet", "", "```markdown", snippet, "```", ""]
    parts += ["<h2>Model-card snippet</h2><pre>", html.escape(snippet), "</pre>"]
    return _write_reports(out_dir, "\n".join(md) + "\n", page(title, parts))


def render_before_after(before_json: Path, verify_json: Path, out_dir: Path) -> tuple[Path, Path]:
    """`moeharden report BEFORE/scan.json AFTER/verify.json --out DIR`.

    Raises:
        InputError: either file is missing or not a valid document of its kind.
    """
    before = load_document(before_json, ScanDocument)
    verify = load_document(verify_json, VerifyDocument)
    return render_verify(before, verify, out_dir)


def render_reports(inputs: Sequence[Path], out: Path | None = None) -> tuple[Path, Path]:
    """What `moeharden report` runs: re-render one scan.json, or a before/after pair.

    Where the reports go: ``report.md`` and ``report.html`` in ``out``, or beside the last JSON. A
    missing or empty ``out`` is created and marked as moeharden's. An existing ``report.md`` or
    ``report.html`` is replaced only when moeharden wrote it there (the directory's
    ``.moeharden-output`` marker lists it, as in a ``scan`` or ``verify`` output); a file of the
    user's, a symbolic link (wherever it points) or an ``out`` that is a link is refused before
    anything is written. Each file is written to a temporary file and renamed into place.

    Args:
        inputs: ``[scan.json]`` or ``[BEFORE/scan.json, AFTER/verify.json]``.
        out: output directory (default: beside the last JSON).
    Returns:
        the Markdown and HTML paths.
    Raises:
        UsageError: not one or two inputs. InputError: invalid documents, or a report path that may
        not be written (see above).
    """
    from moeharden.errors import UsageError
    from moeharden.io.outputs import prepare_files_dir

    if len(inputs) not in (1, 2):
        raise UsageError("report takes one scan.json, or BEFORE/scan.json and AFTER/verify.json.")
    if out is not None:                 # a refused --out is reported first, and nothing is created yet
        prepare_files_dir(out, REPORT_NAMES, check_only=True)
    docs = ([load_document(inputs[0], ScanDocument)] if len(inputs) == 1
            else [load_document(inputs[0], ScanDocument), load_document(inputs[1], VerifyDocument)])
    if out is not None:                 # created and marked once the documents are valid
        prepare_files_dir(out, REPORT_NAMES)
    target = Path(out) if out is not None else Path(inputs[-1]).parent
    if len(docs) == 1:
        return render_scan(docs[0], target)
    return render_verify(docs[0], docs[1], target)
