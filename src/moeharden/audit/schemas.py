"""JSON Schemas of every typed document, and ``docs/report-fields.md`` generated from them.

``moeharden schema NAME`` prints :func:`document_schema`; ``moeharden schema --markdown`` prints
:func:`render_markdown`, which is what ``docs/report-fields.md`` holds (a test fails when they drift).
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

from moeharden.audit.documents import ScanDocument
from moeharden.audit.records import EntangleRecord, ManifestDocument, PruneRecord
from moeharden.audit.verdict import Gate, IntegrityReport, VerifyDocument
from moeharden.errors import UsageError

# name → (model, file it describes, who writes it)
DOCUMENTS: dict[str, tuple[type[BaseModel], str, str]] = {
    "scan": (ScanDocument, "scan.json", "`moeharden scan` (`audit/scan.py`; the recovery sections by the "
                                        "attack layer's re-alignment suite)"),
    "verify": (VerifyDocument, "verify.json", "`moeharden verify CKPT --baseline BASE/scan.json` "
                                              "(`audit/verify.py`, `audit/gate.py`)"),
    "gate": (Gate, "gate YAML", "you (`verify --gate FILE`); defaults in `src/moeharden/data/gate-default.yaml`"),
    "integrity": (IntegrityReport, "`verify --pubkey --json` output", "`moeharden verify CKPT --pubkey KEY` "
                                                                       "(`audit/integrity.py`)"),
    "prune": (PruneRecord, "moeharden-prune.json", "`moeharden prune` (`attack/prune.py`), beside the weights"),
    "entangle": (EntangleRecord, "entangle.json", "`moeharden entangle` (`defend/entangle/command.py`), beside "
                                                  "the weights"),
    "manifest": (ManifestDocument, "moeharden-manifest.json", "`moeharden lock` (`defend/lock.py`), inside the "
                                                              "locked release"),
}

HEADER = """# Report fields

<!-- GENERATED from the pydantic models in src/moeharden/audit/{documents,verdict}.py and, for the side
     records, attack/records.py, defend/entangle/record.py and defend/lock.py (beside their producers).
     Do not edit by hand: run `moeharden schema --markdown > docs/report-fields.md`
     (tests/test_documents.py fails when this file drifts from the models). -->

The JSON files are the source of truth; `report.md` / `report.html` are renderings of them and can
be rebuilt from the JSON alone (`moeharden report`). Every document carries a versioned `schema`
and the tool version; reading one validates it (a wrong or hostile file is an input error, exit 3).
`moeharden schema NAME` prints the JSON Schema of each (NAME: {names}). Formulas are explained in
[attacks-and-defenses.md](attacks-and-defenses.md). Numbers are rounded to 6 decimals (gate values
to 4). `null` is JSON's null; a field marked *optional* may be absent.
"""


FOOTER = """## Hub push result (`--push-to-hub`, `--json`)

`moeharden.io.hub.PushResult.to_dict()`: `repo_id`, `repo_url`, `commit_url`, `commit_oid`,
`commit_message` (`moeharden <version>: <what>`), `private`, `files` (repository paths uploaded),
`endpoint`.
"""


def document_schema(name: str) -> dict[str, Any]:
    """The JSON Schema (draft 2020-12, validation mode, on-disk field names) of document ``name``.

    Raises:
        UsageError: an unknown name (the message lists the known ones).
    """
    if name not in DOCUMENTS:
        raise UsageError(f"Unknown document {name!r}.", hint=f"Choose from: {', '.join(DOCUMENTS)}.")
    model, _, _ = DOCUMENTS[name]
    return model.model_json_schema(by_alias=True)


def _ref_name(ref: str) -> str:
    return ref.rsplit("/", 1)[-1]


def _type(s: dict[str, Any]) -> str:
    """A short type string of a JSON Schema node (``list[SweepRecord]``, ``int or null``…)."""
    if "$ref" in s:
        return f"[{_ref_name(s['$ref'])}](#{_ref_name(s['$ref']).lower()})"
    if "const" in s:
        return f"`{s['const']!r}`".replace("'", '"')
    if "enum" in s:
        return " \\| ".join(f'`"{v}"`' if isinstance(v, str) else f"`{v}`" for v in s["enum"])
    if "anyOf" in s:
        return " or ".join(_type(x) for x in s["anyOf"])
    t = s.get("type")
    if t == "array":
        if "prefixItems" in s:
            return "[" + ", ".join(_type(x) for x in s["prefixItems"]) + "]"
        return f"list[{_type(s.get('items', {}))}]"
    if t == "object":
        extra = s.get("additionalProperties")
        return f"map[str → {_type(extra)}]" if isinstance(extra, dict) else "object"
    return {"string": "str", "integer": "int", "number": "float", "boolean": "bool", "null": "null"}.get(t, "any")


def _refs(s: Any) -> list[str]:
    """Every model referenced from a schema node, in order of first appearance."""
    out: list[str] = []
    if isinstance(s, dict):
        if "$ref" in s:
            out.append(_ref_name(s["$ref"]))
        for v in s.values():
            out += [r for r in _refs(v) if r not in out]
    elif isinstance(s, list):
        for v in s:
            out += [r for r in _refs(v) if r not in out]
    return out


def _table(node: dict[str, Any]) -> list[str]:
    required = set(node.get("required", []))
    lines = ["| field | type | meaning |", "|---|---|---|"]
    for field, s in node.get("properties", {}).items():
        desc = s.get("description", "").replace("|", "\\|").replace("\n", " ")
        opt = "" if field in required or s.get("default", 0) is not None else " *(optional)*"
        lines.append(f"| `{field}`{opt} | {_type(s)} | {desc} |")
    return lines


def render_markdown() -> str:
    """The text of ``docs/report-fields.md``: one section per document, one table per model."""
    out = [HEADER.replace("{names}", ", ".join(DOCUMENTS))]
    done: set[str] = set()
    for name, (model, file, writer) in DOCUMENTS.items():
        schema = model.model_json_schema(by_alias=True)
        defs = schema.get("$defs", {})
        out += [f"## `{file}` — `moeharden schema {name}`", "", f"{schema.get('description', '')} Written by {writer}.",
                "", f"### {schema['title']}", "", *_table(schema), ""]
        done.add(schema["title"])
        queue = _refs({k: v for k, v in schema.items() if k != "$defs"})
        while queue:
            ref = queue.pop(0)
            if ref in done:
                continue
            done.add(ref)
            node = defs[ref]
            out += [f"### {ref}", "", node.get("description", ""), "", *_table(node), ""]
            queue += [r for r in _refs(node) if r not in done and r not in queue]
    return "\n".join(out).rstrip() + "\n\n" + FOOTER
