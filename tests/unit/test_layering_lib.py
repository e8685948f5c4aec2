"""The library's imports run one way: ``medsegx.modeling`` at the bottom, and no cycles.

Every ``import`` / ``from ... import`` anywhere in a module counts, at module level or inside a
function (a lazy import still closes a circle, it only hides it until run time). ``from X import
name`` is an edge to the module ``X.name`` when that is a module, else to ``X``. The implicit
edge from a submodule to its parent package (Python runs ``medsegx/modeling/__init__.py``
before ``medsegx.modeling.model``) is not an edge: a package that re-exports its submodules
would otherwise always be a cycle. ``tests/app/test_layering.py`` checks the app's folders.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

LIB_DIR = Path(__file__).resolve().parents[2] / "lib"
PACKAGE = "medsegx"
BOTTOM = "medsegx.modeling"


def _modules() -> dict[str, Path]:
    """Dotted module name -> file, for every module of ``lib/medsegx`` (packages by their name)."""
    modules = {}
    for path in sorted((LIB_DIR / PACKAGE).rglob("*.py")):
        dotted = ".".join(path.relative_to(LIB_DIR).with_suffix("").parts)
        modules[dotted.removesuffix(".__init__")] = path
    return modules


MODULES = _modules()


def _absolute(module: str, path: Path, node: ast.ImportFrom) -> str:
    """The absolute module a ``from`` import names (relative imports resolved against ``module``)."""
    if node.level == 0:
        return node.module
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    base = package[: len(package) - node.level + 1]
    return ".".join(base + ([node.module] if node.module else []))


def _imports(module: str, path: Path) -> set[str]:
    """The ``medsegx`` modules that ``module`` imports anywhere in its file."""
    targets = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            targets.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            source = _absolute(module, path, node)
            for alias in node.names:
                submodule = f"{source}.{alias.name}"
                targets.add(submodule if submodule in MODULES else source)
    return {target for target in targets if target == PACKAGE or target.startswith(PACKAGE + ".")}


GRAPH = {module: _imports(module, path) for module, path in MODULES.items()}


def _in_bottom(module: str) -> bool:
    return module == BOTTOM or module.startswith(BOTTOM + ".")


def _find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as ``[a, b, ..., a]``, or None (depth-first search, white/grey/black)."""
    done: set[str] = set()
    stack: list[str] = []
    on_stack: set[str] = set()

    def visit(node: str) -> list[str] | None:
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph.get(node, ())):
            if target in on_stack:
                return stack[stack.index(target):] + [target]
            if target not in done:
                cycle = visit(target)
                if cycle:
                    return cycle
        stack.pop()
        on_stack.discard(node)
        done.add(node)
        return None

    for start in sorted(graph):
        if start not in done:
            cycle = visit(start)
            if cycle:
                return cycle
    return None


def test_the_parser_sees_the_library():
    """The checks below are not vacuous: they see the modules and the known edges."""
    assert {"medsegx.modeling.model", "medsegx.items", "medsegx.transforms"} <= set(MODULES)
    assert "medsegx.modeling.model" in GRAPH["medsegx.transforms"]
    assert "medsegx.modeling.normalize" in GRAPH["medsegx.modeling.model"]


@pytest.mark.parametrize("module", [name for name in MODULES if _in_bottom(name)])
def test_modeling_imports_only_modeling(module):
    """segment-anything's ``modeling/`` habit: the network imports nothing else of the package."""
    upward = sorted(target for target in GRAPH[module] if not _in_bottom(target))
    assert not upward, f"{module} imports up the house, outside {BOTTOM}: {upward}"


def test_no_import_cycle():
    cycle = _find_cycle(GRAPH)
    assert cycle is None, "import cycle among medsegx modules: " + " -> ".join(cycle)


def test_a_cycle_is_reported():
    """The old circle items -> transforms -> modeling.model -> items is found and spelled out."""
    graph = {"medsegx.items": {"medsegx.transforms"}, "medsegx.transforms": {"medsegx.modeling.model"},
             "medsegx.modeling.model": {"medsegx.items"}, "medsegx.taxonomy": set()}
    assert _find_cycle(graph) == ["medsegx.items", "medsegx.transforms", "medsegx.modeling.model", "medsegx.items"]
    assert _find_cycle({"a": {"b"}, "b": set()}) is None
