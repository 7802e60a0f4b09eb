"""``docs/families.md``'s coverage table, rendered from the registry table alone.

:func:`coverage_rows` describes every entry (supported or refused, with the reason);
:func:`render_families_md` writes the whole generated section; ``tests/test_discovery.py`` fails
when the file drifts, and ``python -m moeharden.model.famdoc docs/families.md`` regenerates it.
"""

from __future__ import annotations

import sys
from pathlib import Path

from moeharden.model.families import FAMILIES
from moeharden.model.spec import FamilySpec

BEGIN = "<!-- BEGIN GENERATED: python -m moeharden.model.famdoc docs/families.md -->"
END = "<!-- END GENERATED -->"


def router_kind(spec: FamilySpec) -> str:
    """A short description of how the family routes (score, selection, combine weights)."""
    score = {"softmax": "softmax", "sigmoid": "sigmoid", "probs": "router-normalised probs"}[spec.score]
    parts = [] if spec.combine.startswith("topk_logits") else [score]
    if spec.selection_bias:
        parts.append("biased selection")
    if spec.group_keys:
        parts.append("group-limited")
    combine = {"topk_probs": "top-k", "topk_logits_softmax": "softmax over top-k logits",
               "topk_logits_sigmoid": "sigmoid of top-k logits", "custom": "custom combine"}[spec.combine]
    parts.append(combine)
    if spec.weight_on_input:
        parts.append("weight scales the input")
    return ", ".join(parts)


def coverage_rows() -> list[tuple[str, str, str, str, str]]:
    """(family, model types, router kind, status, reason/notes) for every registry entry."""
    rows = []
    for f in FAMILIES:
        status = "refused" if f.refuse else "supported"
        rows.append((f.name, ", ".join(f"`{t}`" for t in f.model_types), router_kind(f), status,
                     f.refuse or f.notes))
    return rows


def render_table() -> str:
    """The generated markdown section (between the BEGIN/END markers)."""
    n_ok = sum(1 for f in FAMILIES if not f.refuse)
    lines = [BEGIN, "", f"{n_ok} supported and {len(FAMILIES) - n_ok} refused families.", "",
             "| family | model_type | router kind | status | reason / notes |", "|---|---|---|---|---|"]
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in coverage_rows()]
    return "\n".join(lines + ["", END])


def render_families_md(existing: str) -> str:
    """``existing`` with its generated section replaced (appended when it has none)."""
    if BEGIN in existing and END in existing:
        head, rest = existing.split(BEGIN, 1)
        return head + render_table() + rest.split(END, 1)[1]
    return existing.rstrip("\n") + "\n\n## Coverage (generated)\n\n" + render_table() + "\n"


def main(argv: list[str]) -> int:
    """Regenerate the file named in ``argv`` (default ``docs/families.md``)."""
    path = Path(argv[0] if argv else "docs/families.md")
    path.write_text(render_families_md(path.read_text()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
