"""No modules of imcap/ import each other, directly or in a loop: every import statement counts,
at module level, inside functions and under `if TYPE_CHECKING:` alike (read with `ast`, nothing
is imported)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "imcap"


def module_names(package: Path) -> dict[str, Path]:
    """Dotted name -> file, for every .py under `package` (a package is its __init__.py)."""
    names = {}
    for path in sorted(package.rglob("*.py")):
        parts = path.relative_to(package.parent).with_suffix("").parts
        names[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return names


def imported_modules(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The modules of `modules` that `name` imports anywhere in its file. `from X import y` is an
    import of X.y where X.y is a module, else of X."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: from . import x, from ..y import z
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            submodules = {f"{source}.{alias.name}" for alias in node.names} & modules.keys()
            found |= submodules
            if len(submodules) < len(node.names):
                found.add(source)
    return {m for m in found if m in modules and m != name}


def import_cycles(package: Path) -> list[list[str]]:
    """One cycle (a -> b -> ... -> a) for each group of modules that reach each other by imports."""
    modules = module_names(package)
    graph = {name: sorted(imported_modules(name, path, modules)) for name, path in modules.items()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    groups: list[set[str]] = []

    def visit(node: str) -> None:  # Tarjan's strongly connected components
        index[node] = low[node] = len(index)
        stack.append(node)
        for dep in graph[node]:
            if dep not in index:
                visit(dep)
                low[node] = min(low[node], low[dep])
            elif dep in stack:
                low[node] = min(low[node], index[dep])
        if low[node] == index[node]:
            group = set()
            while True:
                member = stack.pop()
                group.add(member)
                if member == node:
                    break
            if len(group) > 1:
                groups.append(group)

    for name in graph:
        if name not in index:
            visit(name)
    return [shortest_cycle(graph, group) for group in groups]


def shortest_cycle(graph: dict[str, list[str]], group: set[str]) -> list[str]:
    """A shortest import loop through the group's first module, to name in the failure."""
    start = min(group)
    paths = {start: [start]}
    frontier = [start]
    while frontier:
        following = []
        for node in frontier:
            for dep in graph[node]:
                if dep == start:
                    return [*paths[node], start]
                if dep in group and dep not in paths:
                    paths[dep] = [*paths[node], dep]
                    following.append(dep)
        frontier = following
    raise AssertionError(f"no loop through {start}")  # a strongly connected group always has one


def test_no_modules_of_imcap_import_each_other():
    cycles = import_cycles(PACKAGE)
    assert not cycles, "import circles in imcap/: " + "; ".join(" -> ".join(c) for c in cycles)


def test_a_loop_through_function_level_and_relative_imports_is_named(tmp_path):
    """The check itself: a three-module loop closed by an import inside a function, one relative
    import, and a package __init__ are all seen."""
    pkg = tmp_path / "imcap"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("from imcap.sub.b import B\n")
    (pkg / "a.py").write_text("from imcap import sub\n")
    (pkg / "sub" / "b.py").write_text("from ..c import C\nB = 1\n")
    (pkg / "c.py").write_text("C = 2\n\ndef late():\n    import imcap.a\n")
    (pkg / "alone.py").write_text("import os\nfrom imcap import c\n")
    assert import_cycles(pkg) == [["imcap.a", "imcap.sub", "imcap.sub.b", "imcap.c", "imcap.a"]]
