"""Render reports (Markdown and self-contained HTML) from report JSON alone.

``scan.json`` (schema ``moeharden.scan/1``) is the source of truth; this module only reads it.
HTML embeds its plots as inline PNG (base64), so the file can be mailed or archived as is.
"""

from __future__ import annotations

import base64
import html
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from moeharden.errors import InputError

SCAN_SCHEMA = "moeharden.scan/1"

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;max-width:1100px;margin:2em auto;
padding:0 1em;color:#222}
h1{font-size:1.6em}h2{border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:1.8em}
table{border-collapse:collapse;margin:.8em 0;font-size:.9em}
th,td{border:1px solid #ccc;padding:.3em .6em;text-align:right}th{background:#f4f4f4}
td:first-child,th:first-child{text-align:left}
.pass{color:#137333;font-weight:600}.fail{color:#b3261e;font-weight:600}
.meta{color:#666;font-size:.85em}img{max-width:100%;margin:.4em 0;border:1px solid #eee}
.grid{display:grid;grid-template-columns:1fr 1fr;gap:1em}
"""


def load_report_json(path: Path, schema_prefix: str) -> dict[str, Any]:
    """Read a report JSON and check its schema.

    Raises:
        InputError: missing file, invalid JSON, or a different schema.
    """
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise InputError(f"Report file {path} does not exist.",
                         hint="Pass the scan.json written by `moeharden scan`.") from None
    except (OSError, json.JSONDecodeError) as err:
        raise InputError(f"Could not read {path} as JSON: {err}.") from None
    schema = data.get("schema", "") if isinstance(data, dict) else ""
    if not str(schema).startswith(schema_prefix):
        raise InputError(f"{path} has schema {schema!r}, expected {schema_prefix}*.",
                         hint="Point at the JSON written by the matching moeharden command.")
    return data


def _fmt(v: Any, digits: int = 3) -> str:
    if v is None:
        return "—"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def _md_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(_fmt(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


def _html_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = []
    for r in rows:
        cells = []
        for c in r:
            text = _fmt(c)
            cls = ' class="pass"' if text == "pass" else ' class="fail"' if text == "FAIL" else ""
            cells.append(f"<td{cls}>{html.escape(text)}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table><tr>{head}</tr>{''.join(body)}</table>"


def _img(png: bytes, alt: str) -> str:
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode()}">'


def headline_rows(scan: Mapping[str, Any]) -> list[list[Any]]:
    """Per task: the best attacker's retained fraction at 25% and 50% of experts kept."""
    rows = []
    for t in scan.get("tasks", []):
        h = scan.get("headline", {}).get(t["name"], {})
        q, half = h.get("keep_25", {}), h.get("keep_50", {})
        rows.append([t["name"], t["metric"], t["full"], t.get("chance"),
                     q.get("keep"), q.get("retained"), q.get("method"),
                     half.get("keep"), half.get("retained"), half.get("method")])
    return rows


HEADLINE_HEADER = ["task", "metric", "full", "chance", "keep@25%", "retained", "best method",
                   "keep@50%", "retained", "best method"]


def sweep_table(scan: Mapping[str, Any], task: str) -> tuple[list[str], list[list[Any]]]:
    """Pivot of one task's sweep: rows = methods, columns = keep-counts (retained fraction)."""
    rows = [r for r in scan.get("sweep", []) if r["task"] == task]
    keeps = sorted({r["keep"] for r in rows}, reverse=True)
    methods = sorted({r["method"] for r in rows}, key=lambda m: (m == "random", m))
    table = []
    for m in methods:
        cells = {r["keep"]: r["retained"] for r in rows if r["method"] == m}
        table.append([m] + [cells.get(k) for k in keeps])
    return ["method \\ keep"] + [str(k) for k in keeps], table


def render_scan(scan: Mapping[str, Any], out_dir: Path) -> tuple[Path, Path]:
    """Write ``report.md`` and ``report.html`` for a scan into ``out_dir``; returns both paths."""
    from moeharden import plots

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model = scan.get("model", {})
    E = int(model.get("num_experts", 0)) or 1
    title = f"moeharden scan — {model.get('name') or model.get('path', '')}"
    meta = (f"family {model.get('family')} · {E} experts · top-{model.get('top_k')} · "
            f"moeharden {scan.get('tool', {}).get('version')} · {scan.get('created', '')}")
    md = [f"# {title}", "", f"_{meta}_", "", "## Headline", "",
          "If someone steals this checkpoint and keeps only the experts a task uses, this much of the "
          "task survives (best attacker per task; retained = pruned ÷ full metric):", "",
          _md_table(HEADLINE_HEADER, headline_rows(scan)), ""]
    parts = [f"<h1>{html.escape(title)}</h1><p class='meta'>{html.escape(meta)}</p>", "<h2>Headline</h2>",
             "<p>If someone steals this checkpoint and keeps only the experts a task uses, this much of "
             "the task survives (best attacker per task; retained = pruned ÷ full metric).</p>",
             _html_table(HEADLINE_HEADER, headline_rows(scan))]
    layers = model.get("moe_layers", [])
    for t in scan.get("tasks", []):
        name = t["name"]
        rows = [r for r in scan.get("sweep", []) if r["task"] == name]
        header, table = sweep_table(scan, name)
        md += [f"## Task `{name}`", "", f"metric {t['metric']}: full {_fmt(t['full'])}, chance {_fmt(t.get('chance'))}",
               "", "Retained fraction by method and experts kept per layer:", "", _md_table(header, table), ""]
        parts += [f"<h2>Task <code>{html.escape(name)}</code></h2>",
                  f"<p>metric {html.escape(t['metric'])}: full {_fmt(t['full'])}, chance {_fmt(t.get('chance'))}</p>",
                  _html_table(header, table)]
        if rows:
            parts.append(_img(plots.retained_curves(name, E, rows), f"{name} retained vs keep"))
        mats = {m: per_task[name] for m, per_task in scan.get("attribution", {}).items() if name in per_task}
        if mats and layers:
            parts.append(_img(plots.attribution_heatmaps(name, layers, mats), f"{name} attribution heatmaps"))
        rec = [r for r in scan.get("recovery", []) if r["task"] == name]
        for keep in sorted({r["keep"] for r in rec}):
            sub = [r for r in rec if r["keep"] == keep]
            parts.append(_img(plots.recovery_curves(name, keep, sub, full=t["full"]), f"{name} recovery keep {keep}"))
    ltr = scan.get("labels_to_recover")
    if ltr:
        strategies = sorted({s for v in ltr.values() for s in v})
        lrows = [[task] + [v.get(s) for s in strategies] for task, v in ltr.items()]
        md += ["## Labels to recover", "", _md_table(["task"] + strategies, lrows), ""]
        parts += ["<h2>Labels to recover</h2>", _html_table(["task"] + strategies, lrows)]
    timings = scan.get("timings", {})
    if timings:
        trows = [[k, v] for k, v in timings.items()]
        md += ["## Timings (s)", "", _md_table(["step", "seconds"], trows), ""]
        parts += ["<h2>Timings (s)</h2>", _html_table(["step", "seconds"], trows)]
    md_path, html_path = out_dir / "report.md", out_dir / "report.html"
    md_path.write_text("\n".join(md) + "\n")
    html_path.write_text(
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"<style>{_CSS}</style></head><body>{''.join(parts)}</body></html>\n")
    return md_path, html_path


def rerender(scan_json: Path, out_dir: Path | None = None) -> tuple[Path, Path]:
    """Re-render a scan's reports from its JSON alone (``moeharden report DIR/scan.json``)."""
    scan = load_report_json(scan_json, "moeharden.scan/")
    return render_scan(scan, out_dir or Path(scan_json).parent)


# --------------------------------------------------------------------------- before / after
GATE_HEADER = ["check", "task", "keep", "attack", "value", "threshold", "result"]


def gate_table_rows(verify: Mapping[str, Any]) -> list[list[Any]]:
    return [[r["check"], r.get("task") or "—", r.get("keep"), r.get("attack"), r["value"],
             f"{r['op']} {r['threshold']}", "pass" if r["pass"] else "FAIL"] for r in verify.get("gate", [])]


def model_card_snippet(before: Mapping[str, Any], verify: Mapping[str, Any]) -> str:
    """A Markdown section a publisher can paste into the model card."""
    after = verify.get("attack", {})
    lines = ["## Expert-pruning robustness (moeharden)", "",
             f"Checked with moeharden {verify.get('tool', {}).get('version')} on {verify.get('created', '')[:10]}: "
             f"gate **{'PASSED' if verify.get('passed') else 'FAILED'}**.", "",
             "| task | full (baseline → hardened) | best attack retained @50% (baseline → hardened) |",
             "|---|---|---|"]
    bfull = {t["name"]: t["full"] for t in before.get("tasks", [])}
    for t in after.get("tasks", []):
        bh = before.get("headline", {}).get(t["name"], {}).get("keep_50", {})
        ah = after.get("headline", {}).get(t["name"], {}).get("keep_50", {})
        lines.append(f"| {t['name']} | {_fmt(bfull.get(t['name']))} → {_fmt(t['full'])} | "
                     f"{_fmt(bh.get('retained'))} → {_fmt(ah.get('retained'))} |")
    return "\n".join(lines) + "\n"


def render_verify(before: Mapping[str, Any], verify: Mapping[str, Any], out_dir: Path) -> tuple[Path, Path]:
    """Before/after report: gate table, retained-vs-keep side by side, recovery curves, heatmaps."""
    from moeharden import plots

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    after = verify.get("attack", {})
    E = int(after.get("model", {}).get("num_experts", 0)) or 1
    verdict = "PASSED" if verify.get("passed") else "FAILED"
    title = f"moeharden verify — {after.get('model', {}).get('name', '')}: gate {verdict}"
    md = [f"# {title}", "", f"_moeharden {verify.get('tool', {}).get('version')} · {verify.get('created', '')}_", "",
          "## Gate", "", _md_table(GATE_HEADER, gate_table_rows(verify)), ""]
    parts = [f"<h1>{html.escape(title)}</h1>",
             f"<p class='meta'>moeharden {html.escape(str(verify.get('tool', {}).get('version')))} · "
             f"{html.escape(str(verify.get('created', '')))}</p>",
             "<h2>Gate</h2>", _html_table(GATE_HEADER, gate_table_rows(verify))]
    integ = verify.get("integrity")
    if integ is not None:
        md += ["## Manifest", "", f"integrity ok: {integ.get('ok')}", ""]
        parts.append(f"<h2>Manifest</h2><p>integrity ok: <b>{html.escape(str(integ.get('ok')))}</b></p>")
    md += ["## Headline (before → after)", "", "Before:", "", _md_table(HEADLINE_HEADER, headline_rows(before)), "",
           "After:", "", _md_table(HEADLINE_HEADER, headline_rows(after)), ""]
    parts += ["<h2>Headline</h2><h3>Before</h3>", _html_table(HEADLINE_HEADER, headline_rows(before)),
              "<h3>After</h3>", _html_table(HEADLINE_HEADER, headline_rows(after))]
    layers = after.get("model", {}).get("moe_layers", [])
    for t in after.get("tasks", []):
        name = t["name"]
        parts.append(f"<h2>Task <code>{html.escape(name)}</code></h2><div class='grid'>")
        for label, doc in (("before", before), ("after", after)):
            rows = [r for r in doc.get("sweep", []) if r["task"] == name]
            if rows:
                parts.append(_img(plots.retained_curves(name, E, rows, title=f"{name}: {label}"),
                                  f"{name} retained {label}"))
        parts.append("</div><div class='grid'>")
        for label, doc in (("before", before), ("after", after)):
            rec = [r for r in doc.get("recovery", []) if r["task"] == name]
            for keep in sorted({r["keep"] for r in rec}):
                sub = [r for r in rec if r["keep"] == keep and r["mode"] in ("full", "distill")]
                full = next((x["full"] for x in doc.get("tasks", []) if x["name"] == name), None)
                parts.append(_img(plots.recovery_curves(f"{name} ({label})", keep, sub, full=full,
                                                        target=None if full is None else 0.95 * full),
                                  f"{name} recovery {label}"))
        parts.append("</div>")
        mats = {m: per[name] for m, per in after.get("attribution", {}).items() if name in per}
        if mats and layers:
            parts.append(_img(plots.attribution_heatmaps(f"{name} (after)", layers, mats), f"{name} heatmaps after"))
        for label, doc in (("before", before), ("after", after)):
            header, table = sweep_table(doc, name)
            md += [f"### {name} — retained by method and keep ({label})", "", _md_table(header, table), ""]
    snippet = model_card_snippet(before, verify)
    md += ["## Model-card snippet", "", "```markdown", snippet, "```", ""]
    parts += ["<h2>Model-card snippet</h2><pre>", html.escape(snippet), "</pre>"]
    md_path, html_path = out_dir / "report.md", out_dir / "report.html"
    md_path.write_text("\n".join(md) + "\n")
    html_path.write_text(
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"<style>{_CSS}</style></head><body>{''.join(parts)}</body></html>\n")
    return md_path, html_path


def render_before_after(before_json: Path, verify_json: Path, out_dir: Path) -> tuple[Path, Path]:
    """`moeharden report BEFORE/scan.json AFTER/verify.json --out DIR`."""
    before = load_report_json(before_json, "moeharden.scan/")
    verify = load_report_json(verify_json, "moeharden.verify/")
    return render_verify(before, verify, out_dir)
