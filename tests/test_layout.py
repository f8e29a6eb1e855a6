"""The package's shape: no module imports another that imports it back, lazily or not (issue 22: plugin.py,
items.py and session.py did)."""

from __future__ import annotations

import ast
from graphlib import CycleError, TopologicalSorter
from pathlib import Path

import pytest_slmdeploy

PACKAGE = Path(pytest_slmdeploy.__file__).parent


def _imports() -> dict[str, set[str]]:
    """module -> the package's modules it imports anywhere in its text (in functions too)."""
    modules = {
        ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(".__init__"): path
        for path in PACKAGE.rglob("*.py")
    }
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        found: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                found |= {node.module} | {f"{node.module}.{alias.name}" for alias in node.names}
            elif isinstance(node, ast.Import):
                found |= {alias.name for alias in node.names}
        graph[name] = (found & modules.keys()) - {name, "pytest_slmdeploy"}
    return graph


def test_no_module_of_the_package_imports_one_that_imports_it_back() -> None:
    graph = _imports()
    assert {"pytest_slmdeploy.plugin", "pytest_slmdeploy.items", "pytest_slmdeploy.session"} <= graph.keys()
    try:
        tuple(TopologicalSorter(graph).static_order())
    except CycleError as exc:
        raise AssertionError(f"import circle: {' -> '.join(exc.args[1])}") from None
