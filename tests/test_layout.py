"""The layout is the architecture: the package's parts and what may import what."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "latentfuse"
PARTS = ("method", "training", "deploy", "cli", "data", "evaluation", "pipelines", "testing")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path, top_level_only: bool = False) -> set[str]:
    """Absolute module names `path` imports (anywhere, or at module level only)."""
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    names = set()
    for node in nodes:
        if isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
    return names


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def test_the_package_has_its_parts_as_folders():
    assert all((PACKAGE / part / "__init__.py").is_file() for part in PARTS)


@pytest.mark.parametrize("name", [n for n in MODULES if not n.startswith("latentfuse.cli")])
def test_no_library_module_imports_the_command_line_or_the_experiments(name):
    bad = {
        n
        for n in imports(MODULES[name])
        if n.startswith(("latentfuse.cli", "experiments", "tests", "bench"))
    }
    assert not bad, f"{name} imports {sorted(bad)}"


def test_module_level_imports_have_no_cycle():
    graph = {
        name: {n for n in imports(path, top_level_only=True) if n in MODULES and n != name}
        for name, path in MODULES.items()
    }
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in graph[node]:
            if state.get(nxt) == 1:
                cycle = path[path.index(nxt) :] + [nxt]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt, [*path, nxt])
        state[node] = 2

    for name in graph:
        if name not in state:
            visit(name, [name])
