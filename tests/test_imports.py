"""moectl's modules import one way: no module-level import cycle, and the sweep package and the
summary each import on their own in a fresh interpreter (an import order that only works because
something else was imported first is a cycle waiting to bite)."""
import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "moectl"


def module_graph() -> dict[str, set[str]]:
    """moectl module -> the moectl modules it imports at module level (imports inside functions
    are left out: they run later and cannot close a cycle at import time)."""
    files = {".".join(p.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(".__init__"): p
             for p in PACKAGE.rglob("*.py")}
    graph = {}
    for name, path in files.items():
        deps = set()
        for node in ast.parse(path.read_text(encoding="utf-8")).body:
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "moectl":
                for alias in node.names:  # `from moectl import store` names a module, not an attribute
                    full = f"{node.module}.{alias.name}"
                    deps.add(full if full in files else node.module)
            elif isinstance(node, ast.Import):
                deps |= {a.name for a in node.names if a.name.split(".")[0] == "moectl"}
        graph[name] = deps & files.keys()
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str]:
    done: set[str] = set()

    def visit(node: str, path: list[str]) -> list[str]:
        if node in path:
            return path[path.index(node):] + [node]
        if node in done:
            return []
        for dep in sorted(graph[node]):
            cycle = visit(dep, path + [node])
            if cycle:
                return cycle
        done.add(node)
        return []

    for start in sorted(graph):
        cycle = visit(start, [])
        if cycle:
            return cycle
    return []


def test_the_graph_reader_sees_the_known_edges():
    graph = module_graph()
    assert {"moectl.sweep.store", "moectl.sweep.report"} <= graph["moectl.summary"]
    assert "moectl.summary" in graph["moectl.sweep.run"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


def test_no_module_level_import_cycle():
    assert find_cycle(module_graph()) == []


@pytest.mark.parametrize("module", ["moectl.summary", "moectl.sweep.spec", "moectl.sweep.store",
                                    "moectl.sweep.report", "moectl.sweep.run", "moectl.cli.sweep"])
def test_imports_alone_in_a_fresh_interpreter(module):
    r = subprocess.run([sys.executable, "-c", f"import {module}"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
