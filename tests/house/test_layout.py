"""The house rules that a reader relies on: no import cycle, no module over 500 lines.

The layer and independence contracts are import-linter's (``[tool.importlinter]`` in pyproject.toml,
run by ``make lint``); this file checks what those contracts do not: that no two modules of the
project import each other through any chain, imports inside functions included (grimp reads every
import statement of a module, wherever it is).
"""

from __future__ import annotations

from pathlib import Path

import grimp
import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("app", "models", "index")
MAX_LINES = 500


def import_cycles(graph: grimp.ImportGraph) -> list[list[str]]:
    """The strongly connected sets of more than one module (Tarjan's algorithm, iterative)."""
    order: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []
    for start in sorted(graph.modules):
        if start in order:
            continue
        work = [(start, iter(sorted(graph.find_modules_directly_imported_by(start))))]
        order[start] = low[start] = len(order)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, targets = work[-1]
            for target in targets:
                if target not in order:
                    order[target] = low[target] = len(order)
                    stack.append(target)
                    on_stack.add(target)
                    work.append((target, iter(sorted(graph.find_modules_directly_imported_by(target)))))
                    break
                if target in on_stack:
                    low[node] = min(low[node], order[target])
            else:
                work.pop()
                if work:
                    parent = work[-1][0]
                    low[parent] = min(low[parent], low[node])
                if low[node] == order[node]:
                    members = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        members.append(member)
                        if member == node:
                            break
                    if len(members) > 1:
                        cycles.append(sorted(members))
    return cycles


@pytest.fixture(scope="module")
def graph() -> grimp.ImportGraph:
    return grimp.build_graph(*PACKAGES, cache_dir=None)


def test_the_cycle_finder_finds_a_cycle() -> None:
    """The check below can fail: a two-module circle and a three-module one are both found."""
    graph = grimp.ImportGraph()
    for module in ("a", "a.x", "a.y", "a.p", "a.q", "a.r", "a.z"):
        graph.add_module(module)
    for importer, imported in [
        ("a.x", "a.y"),
        ("a.y", "a.x"),
        ("a.p", "a.q"),
        ("a.q", "a.r"),
        ("a.r", "a.p"),
    ]:
        graph.add_import(importer=importer, imported=imported, line_number=1, line_contents="import")
    graph.add_import(importer="a.z", imported="a.x", line_number=1, line_contents="import")
    assert sorted(import_cycles(graph)) == [["a.p", "a.q", "a.r"], ["a.x", "a.y"]]


def test_no_import_cycle(graph: grimp.ImportGraph) -> None:
    cycles = import_cycles(graph)
    assert not cycles, "import cycles (imports inside functions count):\n" + "\n".join(map(str, cycles))


def test_imports_inside_functions_count(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A circle closed by an import inside a function is a circle: grimp reads it."""
    package = tmp_path / "lazycircle"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "a.py").write_text("def f():\n    from lazycircle import b\n\n    return b\n")
    (package / "b.py").write_text("from lazycircle import a\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    graph = grimp.build_graph("lazycircle", cache_dir=None)
    assert import_cycles(graph) == [["lazycircle.a", "lazycircle.b"]]


def test_no_module_over_500_lines() -> None:
    long = {
        str(path.relative_to(ROOT)): lines
        for package in PACKAGES
        for path in (ROOT / package).rglob("*.py")
        if (lines := len(path.read_text().splitlines())) > MAX_LINES
    }
    assert not long, f"modules over {MAX_LINES} lines: {long}"
