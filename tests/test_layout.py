"""The package's shape: imports point one way (no cycle between modules), and no file is over 300 lines.

Parsed with ``ast``, not imported, so a cycle is found even where Python happens to tolerate it. Every import counts
-- at module level, inside a function or method, under ``try`` -- because an import inside a function is still an
import (STYLE.md); only those under ``if TYPE_CHECKING:`` are left out, since they never run.

``from lm_lightning.a import b`` is an edge to the module ``lm_lightning.a.b`` when ``b`` is one, else to
``lm_lightning.a`` (a package's ``__init__``). Python also runs the ``__init__`` of every package on the way, so an
import of ``lm_lightning.a.b`` from outside package ``a`` is an edge to ``lm_lightning.a`` too: if that ``__init__``
imports (through any chain) the importing module, the first of the two imported fails with "partially initialized
module" (hparams -> callbacks.export -> callbacks/__init__ -> console -> hparams did). A module inside ``a`` importing
its sibling gets no such edge: its package is already being initialized, which Python allows.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = "lm_lightning"
ROOT = Path(__file__).resolve().parent.parent / PACKAGE
MAX_LINES = 300


def module_files() -> dict[str, Path]:
    """Dotted module name -> file, a package being its ``__init__.py``."""
    modules = {}
    for path in sorted(ROOT.rglob("*.py")):
        parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(node: ast.AST):
    """Every Import / ImportFrom under ``node``, skipping the bodies of ``if TYPE_CHECKING:`` (not their ``else``)."""
    for child in ast.iter_child_nodes(node):
        if isinstance(child, ast.If) and _is_type_checking(child.test):
            for other in child.orelse:
                yield from _imports_of(other)
            continue
        yield from _imports_of(child)


def _imports_of(node: ast.AST):
    if isinstance(node, (ast.Import, ast.ImportFrom)):
        yield node
    yield from _imports(node)


def _absolute(node: ast.ImportFrom, module: str, is_package: bool) -> str:
    """The module an ImportFrom names, relative ones (``from .x import y``) resolved against ``module``."""
    if not node.level:
        return node.module or ""
    base = module.split(".")
    base = base if is_package else base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join([*base, *([node.module] if node.module else [])])


def import_graph() -> dict[str, set[str]]:
    """Module -> the modules of this package it imports (a package means its ``__init__``)."""
    modules = module_files()
    graph: dict[str, set[str]] = {}
    for module, path in modules.items():
        targets: set[str] = set()
        for node in _imports(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            if isinstance(node, ast.Import):
                targets.update(alias.name for alias in node.names)
                continue
            source = _absolute(node, module, path.name == "__init__.py")
            for alias in node.names:
                # `from a import b` imports the submodule a.b when b is one, else a name defined in a.
                submodule = f"{source}.{alias.name}"
                targets.add(submodule if submodule in modules else source)
        # The __init__ of each package on the way to a target, unless the importing module is inside that package.
        on_the_way = {".".join(t.split(".")[:i]) for t in targets for i in range(2, t.count(".") + 1)}
        targets |= {p for p in on_the_way if not module.startswith(p + ".")}
        graph[module] = {t for t in targets if t in modules and t != module}
    return graph


def knots(graph: dict[str, set[str]]) -> list[list[str]]:
    """The import cycles, one per knot (strongly connected component, Tarjan's algorithm): each as a cycle
    ``[a, b, ..., a]`` through the knot, followed by any of the knot's modules that cycle does not pass through.

    A knot rather than every cycle: one knot can hold very many cycles, and untying it is one job."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[set[str]] = []

    def connect(module: str) -> None:
        index[module] = low[module] = len(index)
        stack.append(module)
        for target in graph[module]:
            if target not in index:
                connect(target)
                low[module] = min(low[module], low[target])
            elif target in stack:
                low[module] = min(low[module], index[target])
        if low[module] == index[module]:
            component = set()
            while (member := stack.pop()) != module:
                component.add(member)
            found.append(component | {module})

    for module in sorted(graph):
        if module not in index:
            connect(module)
    return [_cycle_through(graph, sorted(c)) for c in sorted(found, key=min) if len(c) > 1]


def _cycle_through(graph: dict[str, set[str]], knot: list[str]) -> list[str]:
    """A shortest cycle from the knot's first module back to it (breadth-first inside the knot), then the rest."""
    start, members = knot[0], set(knot)
    previous = {start: start}
    frontier = [start]
    while frontier:
        step = []
        for module in frontier:
            for target in sorted(graph[module] & members):
                if target == start:
                    cycle = [module]
                    while cycle[-1] != start:
                        cycle.append(previous[cycle[-1]])
                    cycle = [*reversed(cycle), start]
                    return cycle + [f"(also {m})" for m in knot if m not in cycle]
                if target not in previous:
                    previous[target] = module
                    step.append(target)
        frontier = step
    raise AssertionError(f"{knot} is not a knot")


def test_the_graph_sees_imports_inside_functions_and_not_under_type_checking():
    tree = ast.parse(
        "from typing import TYPE_CHECKING\n"
        "import a\n"
        "if TYPE_CHECKING:\n    import b\nelse:\n    import c\n"
        "def f():\n    from d import e\n"
        "class K:\n    def m(self):\n        import g\n"
    )
    names = [n.names[0].name if isinstance(n, ast.Import) else n.module for n in _imports(tree)]
    assert sorted(names) == ["a", "c", "d", "g", "typing"]
    graph = {"x": {"y"}, "y": {"z", "v"}, "z": {"x"}, "w": {"x"}, "v": {"y"}, "u": set()}
    assert knots(graph) == [["v", "y", "v", "(also x)", "(also z)"]]


def test_no_import_cycles():
    cycles = knots(import_graph())
    assert not cycles, f"{len(cycles)} import cycle(s):\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_no_file_is_over_300_lines():
    lengths = {path: len(path.read_text(encoding="utf-8").splitlines()) for path in ROOT.rglob("*.py")}
    long = sorted((n, str(p.relative_to(ROOT.parent))) for p, n in lengths.items() if n > MAX_LINES)
    assert not long, f"{len(long)} file(s) over {MAX_LINES} lines:\n" + "\n".join(f"{n:5d} {p}" for n, p in long)
