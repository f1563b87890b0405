"""No import cycle between the package's modules: what runs at import time (module-level imports, not the
ones under `if TYPE_CHECKING:` or inside functions) forms no loop. Read from the source (AST), so a cycle
that happens to import in today's order still fails here."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent / "qwen35_lite"


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _top_level_imports(tree: ast.Module):
    """Import nodes that run when the module is imported (`if` bodies too, TYPE_CHECKING ones not)."""
    todo = list(tree.body)
    while todo:
        node = todo.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        elif isinstance(node, ast.If) and "TYPE_CHECKING" not in ast.unparse(node.test):
            todo += node.body + node.orelse
        elif isinstance(node, ast.Try):
            todo += node.body + node.orelse + node.finalbody


def import_graph() -> dict[str, set[str]]:
    files = {_module_name(p): p for p in ROOT.rglob("*.py")}
    packages = {_module_name(p) for p in ROOT.rglob("__init__.py")}
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        base = name if name in packages else name.rpartition(".")[0]
        targets = set()
        for node in _top_level_imports(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets |= {a.name for a in node.names}
                continue
            pkg = base
            for _ in range(node.level - 1):
                pkg = pkg.rpartition(".")[0]
            mod = ".".join(p for p in (pkg if node.level else "", node.module or "") if p)
            targets.add(mod)
            targets |= {f"{mod}.{a.name}" for a in node.names if f"{mod}.{a.name}" in files}
        edges = set()
        for t in targets:
            # importing a.b.c runs a and a.b first, except the packages the importer sits in (already running)
            parts = t.split(".")
            for i in range(1, len(parts) + 1):
                dep = ".".join(parts[:i])
                if dep in files and dep != name and not (name + ".").startswith(dep + "."):
                    edges.add(dep)
        graph[name] = edges
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(n: str) -> list[str] | None:
        state[n] = 1
        path.append(n)
        for m in sorted(graph.get(n, ())):
            if state.get(m) == 1:
                return path[path.index(m) :] + [m]
            if m not in state and (found := visit(m)):
                return found
        path.pop()
        state[n] = 2
        return None

    for n in sorted(graph):
        if n not in state and (found := visit(n)):
            return found
    return None


def test_the_package_has_no_import_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, " -> ".join(cycle)


def test_the_scan_sees_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    graph = import_graph()
    assert "qwen35_lite.experts.layout" in graph["qwen35_lite.experts.stacks"]
    assert "qwen35_lite.weights.fp8" in graph["qwen35_lite.weights.checkpoint"]
