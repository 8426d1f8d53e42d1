"""The shape of the code base: what imports what.

- core imports no plugin, and its modules form no import cycle at import time;
- a plugin imports no other plugin's modules (it may use another plugin only through the
  registry, by name), and of core only the public surface: ``diffplug`` and
  ``diffplug.testing`` (its tests included).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CORE = ROOT / "core" / "src" / "diffplug"
PLUGIN_ROOTS = sorted(
    [*ROOT.glob("plugins/*/src/diffplug_*"), *ROOT.glob("docs/examples/*/src/diffplug_*")]
)
PUBLIC = {"diffplug", "diffplug.testing"}


def module_name(path: Path, package_root: Path) -> str:
    parts = path.relative_to(package_root.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path, *, top_level_only: bool) -> list[tuple[str, int]]:
    """(imported module, line) for every import; with ``top_level_only``, only those that
    run when the module is imported (not inside functions, not under TYPE_CHECKING)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    found: list[tuple[str, int]] = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            nested = in_function or isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef)
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                continue
            if isinstance(child, ast.Import) and not (top_level_only and in_function):
                found.extend((alias.name, child.lineno) for alias in child.names)
            elif (
                isinstance(child, ast.ImportFrom)
                and not (top_level_only and in_function)
                and child.level == 0
                and child.module
            ):
                found.append((child.module, child.lineno))
            visit(child, nested)

    visit(tree, False)
    return found


def plugin_files() -> list[Path]:
    files = []
    for root in PLUGIN_ROOTS:
        files += sorted(root.rglob("*.py"))
        files += sorted((root.parents[1] / "tests").glob("*.py"))
    return files


def own_package(path: Path) -> str:
    for root in PLUGIN_ROOTS:
        if path.is_relative_to(root.parents[1]):
            return root.name
    raise AssertionError(path)


def test_core_imports_no_plugin():
    bad = [
        f"{path.relative_to(ROOT)}:{line}: {name}"
        for path in sorted(CORE.rglob("*.py"))
        for name, line in imports(path, top_level_only=False)
        if name.split(".")[0].startswith("diffplug_")
    ]
    assert not bad, bad


def test_core_has_no_import_cycle_at_import_time():
    graph: dict[str, set[str]] = {}
    for path in sorted(CORE.rglob("*.py")):
        mod = module_name(path, CORE)
        graph[mod] = {
            name
            for name, _ in imports(path, top_level_only=True)
            if name.startswith("diffplug.") and name != mod
        }
    # ``from diffplug.x import y`` imports the package ``diffplug`` first: its __init__ is
    # deliberately lazy (no torch), so edges into the package itself are not cycles
    cycles = []

    def walk(node: str, stack: list[str]) -> None:
        if node in stack:
            cycles.append(" -> ".join(stack[stack.index(node) :] + [node]))
            return
        for nxt in sorted(graph.get(node, ())):
            walk(nxt, [*stack, node])

    for mod in sorted(graph):
        walk(mod, [])
    assert not cycles, sorted(set(cycles))[:5]


@pytest.mark.parametrize("path", plugin_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_a_plugin_imports_only_itself_and_the_public_surface(path):
    own = own_package(path)
    bad = []
    for name, line in imports(path, top_level_only=False):
        top = name.split(".")[0]
        if top.startswith("diffplug_") and top != own:
            bad.append(f"line {line}: {name} (another plugin: use the registry)")
        elif top == "diffplug" and name not in PUBLIC:
            bad.append(f"line {line}: {name} (internal: import from diffplug)")
    assert not bad, bad
