"""Imports run one way: down the layers DESIGN.md draws, with no cycle between modules.

The module graph of ``src/dmquant`` is read from the source with :mod:`ast` (imports inside functions and
``TYPE_CHECKING`` blocks count too); the layers are read from DESIGN.md's ``layers`` block, so the page and
the code cannot drift apart. Run ``python tests/test_layering.py`` to print the graph's cycles and the imports
that go up.
"""

from __future__ import annotations

import ast
import fnmatch
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "dmquant"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """Each module of the package and the modules of the package it imports."""
    paths = {module_name(path): path for path in PACKAGE.rglob("*.py")}
    graph = {}
    for name, path in paths.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom):
                base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
                module = ".".join([*base, *([node.module] if node.module else [])])
                targets |= {f"{module}.{a.name}" if f"{module}.{a.name}" in paths else module for a in node.names}
            elif isinstance(node, ast.Import):
                targets |= {alias.name for alias in node.names}
        graph[name] = {target for target in targets if target in paths and target != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for target in sorted(graph[node]):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while not component or component[-1] != node:
                component.append(stack.pop())
            if len(component) > 1:
                found.append(sorted(component))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10 * len(graph)))
    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def layers() -> list[tuple[str, list[str]]]:
    """DESIGN.md's layers, top first: a name and the module patterns (``dmquant.`` left out) it holds."""
    text = (ROOT / "DESIGN.md").read_text(encoding="utf-8")
    block = re.search(r"```layers\n(.*?)```", text, re.S)
    assert block, "DESIGN.md has no ```layers block"
    rows = [line.split(":", 1) for line in block.group(1).splitlines() if line.strip()]
    return [(name.strip(), patterns.split()) for name, patterns in rows]


def layer_of(module: str, table: list[tuple[str, list[str]]]) -> int:
    """The index (0 = top) of the layer holding ``module``: a pattern naming it exactly wins over a glob."""
    short = module.removeprefix("dmquant.") if module != "dmquant" else "dmquant"
    exact = [i for i, (_, patterns) in enumerate(table) if short in patterns]
    globbed = [i for i, (_, patterns) in enumerate(table) if any(fnmatch.fnmatchcase(short, p) for p in patterns)]
    found = exact or globbed
    assert len(found) == 1, f"{module} is in {len(found)} layers of DESIGN.md"
    return found[0]


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    table = layers()
    level = {module: layer_of(module, table) for module in graph}
    return [
        f"{module} ({table[level[module]][0]}) imports {target} ({table[level[target]][0]})"
        for module, targets in sorted(graph.items())
        for target in sorted(targets)
        if level[target] < level[module]
    ]


def test_no_module_imports_another_that_imports_it_back():
    assert cycles(import_graph()) == []


def test_every_module_imports_only_its_layer_and_the_ones_below():
    assert upward_imports(import_graph()) == []


if __name__ == "__main__":
    graph = import_graph()
    print("cycles:", cycles(graph) or "none")
    print("upward imports:", "\n  ".join(["", *upward_imports(graph)]) if upward_imports(graph) else "none")
