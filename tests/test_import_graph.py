"""yolotune's modules import one another one way: no circle, imports inside functions counted too.

A circle lets a lower layer (reading results, the config's schema) know its users (plots, reports,
the command line), and one of its imports then runs half-initialised the day it moves to the top.
"""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Dict, List, Set

PACKAGE = Path(__file__).resolve().parents[1] / "yolotune"


def import_graph(package: Path) -> Dict[str, Set[str]]:
    """Module -> the package's modules it imports anywhere in its file (top level, functions, ``if``)."""
    root = package.name
    modules = {_module(path, package): path for path in package.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        found = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                found.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = _absolute(node, name, path.name == "__init__.py")
                found.add(base)
                found.update(f"{base}.{alias.name}" for alias in node.names)  # from pkg import module
        # Every module imports its package's __init__ first: an edge to the package itself says nothing.
        graph[name] = {m for m in found if m in modules and m != name and m != root}
    return graph


def _module(path: Path, package: Path) -> str:
    parts = path.relative_to(package.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _absolute(node: ast.ImportFrom, module: str, is_package: bool) -> str:
    if not node.level:
        return node.module
    base = module.split(".")
    base = base[:len(base) - node.level + (1 if is_package else 0)]
    return ".".join(base + ([node.module] if node.module else []))


def circles(graph: Dict[str, Set[str]]) -> List[List[str]]:
    """The import circles a depth-first walk meets, each as [a, b, ..., a]; none for a one-way graph."""
    found, path, done = [], [], set()

    def walk(module: str) -> None:
        path.append(module)
        for imported in sorted(graph[module]):
            if imported in path:
                found.append(path[path.index(imported):] + [imported])
            elif imported not in done:
                walk(imported)
        done.add(path.pop())

    for module in sorted(graph):
        if module not in done:
            walk(module)
    return found


def test_no_module_of_yolotune_imports_back_what_imports_it():
    graph = import_graph(PACKAGE)
    assert "yolotune.results" in graph and "yolotune.importance" in graph["yolotune.plots"]  # it reads the package
    assert circles(graph) == []


def test_reading_results_imports_none_of_its_writers():
    writers = {"yolotune.plots", "yolotune.report", "yolotune.results_cli", "yolotune.importance"}
    assert import_graph(PACKAGE)["yolotune.results"].isdisjoint(writers)


def test_a_circle_through_an_import_inside_a_function_is_found(tmp_path):
    package = tmp_path / "pkg"
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "sub" / "__init__.py").write_text("from .. import c\n")
    (package / "a.py").write_text("from pkg import b\n")
    (package / "b.py").write_text("def f():\n    from pkg.sub import thing\n")
    (package / "c.py").write_text("import pkg.a\n")
    (package / "d.py").write_text("from . import a\n")  # into the circle, not on it
    graph = import_graph(package)
    assert graph == {"pkg": set(), "pkg.sub": {"pkg.c"}, "pkg.a": {"pkg.b"}, "pkg.b": {"pkg.sub"},
                     "pkg.c": {"pkg.a"}, "pkg.d": {"pkg.a"}}
    assert circles(graph) == [["pkg.a", "pkg.b", "pkg.sub", "pkg.c", "pkg.a"]]
