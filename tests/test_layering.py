"""The shape of the package, checked: short modules, no import cycles, documented subpackages.

The layers contract itself (imports only go down) is import-linter's job (``lint-imports`` in
scripts/test.sh, contract in pyproject.toml); these are the rules it does not cover. The import
graph comes from grimp (import-linter's own parser), so function-level imports count too.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "moeharden"
MAX_LINES = 400


def _modules() -> list[Path]:
    return sorted(SRC.rglob("*.py"))


def test_no_module_is_longer_than_a_page():
    too_long = {p.relative_to(SRC.parent).as_posix(): n for p in _modules()
                if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_LINES}
    assert not too_long, f"modules over {MAX_LINES} lines (split them by job): {too_long}"


def _strongly_connected(edges: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's strongly connected components of a directed graph (iterative: no recursion limit)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    out: list[list[str]] = []
    counter = 0
    for root in sorted(edges):
        if root in index:
            continue
        work = [(root, iter(sorted(edges[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(edges.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                comp = []
                while True:
                    w = stack.pop()
                    on_stack.discard(w)
                    comp.append(w)
                    if w == node:
                        break
                out.append(sorted(comp))
    return out


def test_strongly_connected_finds_a_planted_cycle():
    """The cycle finder itself, on a graph whose cycles are known: a→b→c→a and d↔e; f alone."""
    comps = _strongly_connected({"a": {"b"}, "b": {"c"}, "c": {"a", "d"}, "d": {"e"}, "e": {"d"}, "f": set()})
    assert sorted(c for c in comps if len(c) > 1) == [["a", "b", "c"], ["d", "e"]]


def test_no_import_cycles():
    grimp = pytest.importorskip("grimp")
    graph = grimp.build_graph("moeharden")
    edges = {m: {i for i in graph.find_modules_directly_imported_by(m) if i != m} for m in graph.modules}
    cycles = [c for c in _strongly_connected(edges) if len(c) > 1]
    chains = []
    for comp in cycles:                                   # one concrete loop per cycle, for the message
        a = comp[0]
        b = next(i for i in sorted(edges[a]) if i in comp)
        back = graph.find_shortest_chain(importer=b, imported=a)
        chains.append(" -> ".join((a, *back)))
    assert not cycles, "import cycles:\n" + "\n".join(chains)


def test_every_subpackage_says_what_it_is_for():
    missing = [p.relative_to(SRC.parent).as_posix() for p in sorted(SRC.rglob("__init__.py"))
               if not ast.get_docstring(ast.parse(p.read_text(encoding="utf-8")))]
    assert not missing, f"package __init__.py without a docstring: {missing}"


def test_every_module_has_a_docstring():
    missing = [p.relative_to(SRC.parent).as_posix() for p in _modules()
               if not ast.get_docstring(ast.parse(p.read_text(encoding="utf-8")))]
    assert not missing, f"modules without a docstring: {missing}"
