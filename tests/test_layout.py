"""The layers batchrun's folders name, checked from the imports themselves (ast, nothing imported).

From the bottom: policy/ and files/ (pure rules and file formats), state/ (Redis), runner/ (the
workers' side), ops/ (what a command does), api/ (the library), cli/ (click). A layer imports only from below it,
and none of policy/, files/ or state/ imports mock/ (the test server). Imports inside functions,
and those under TYPE_CHECKING, count too: a lazy import is still a dependency.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path
from typing import NamedTuple

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "batchrun"
MAX_MODULE_LINES = 450


class Import(NamedTuple):
    module: str  # the importing module, dotted ("batchrun.runner.shard")
    target: str  # what it imports, dotted and absolute ("batchrun.state.store", "click")
    line: int


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _absolute(node: ast.ImportFrom, module: str, is_package: bool) -> str:
    if node.level == 0:
        return node.module or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[:len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _imports_of(path: Path) -> list[Import]:
    module = _module_name(path)
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [Import(module, alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = _absolute(node, module, path.name == "__init__.py")
            # `from batchrun.runner import sender` imports the module batchrun.runner.sender
            found += [Import(module, f"{base}.{alias.name}" if base.startswith("batchrun") else base, node.lineno)
                      for alias in node.names]
    return found


MODULES = sorted(PACKAGE.rglob("*.py"))
IMPORTS = [imp for path in MODULES for imp in _imports_of(path)]


def _layer(dotted: str) -> str | None:
    """'batchrun.runner.shard' -> 'runner'; a top-level module ('batchrun.settings') -> 'settings'."""
    parts = dotted.split(".")
    return parts[1] if parts[0] == "batchrun" and len(parts) > 1 else None


FORBIDDEN = {
    "policy": {"state", "runner", "remote", "ops", "api", "cli", "mock", "dashboard"},
    "files": {"state", "runner", "remote", "ops", "api", "cli", "mock", "dashboard"},
    "state": {"runner", "remote", "ops", "api", "cli", "mock", "dashboard"},
    "runner": {"ops", "api", "cli", "dashboard"},
    "remote": {"runner", "ops", "api", "cli", "mock", "dashboard"},  # the Batch API sender, beside runner/
    "ops": {"api", "cli", "dashboard"},
    "api": {"cli", "dashboard"},
    "dashboard": {"api", "cli", "mock", "runner", "remote"},  # reads Redis through state/ and ops/ only
}


@pytest.mark.parametrize("layer", sorted(FORBIDDEN))
def test_a_layer_imports_nothing_from_above_it(layer):
    wrong = [f"{imp.module}:{imp.line} imports {imp.target}" for imp in IMPORTS
             if _layer(imp.module) == layer and _layer(imp.target) in FORBIDDEN[layer]]
    assert not wrong, f"{layer}/ must not import from {sorted(FORBIDDEN[layer])}:\n" + "\n".join(wrong)


def test_only_the_cli_imports_click():
    wrong = [f"{imp.module}:{imp.line}" for imp in IMPORTS
             if imp.target.split(".")[0] == "click" and _layer(imp.module) != "cli"]
    assert not wrong, "click outside batchrun/cli/:\n" + "\n".join(wrong)


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one node (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(edges.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(edges):
        if node not in index:
            visit(node)
    return found


def test_cycles_are_found():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_cycle_between_subpackages():
    edges: dict[str, set[str]] = defaultdict(set)
    why: dict[tuple[str, str], str] = {}
    for imp in IMPORTS:
        src, dst = _layer(imp.module), _layer(imp.target)
        if src and dst and src != dst:
            edges[src].add(dst)
            why.setdefault((src, dst), f"{imp.module}:{imp.line} imports {imp.target}")
    cycles = _cycles(edges)
    detail = [f"{a} -> {b}: {why[a, b]}" for cycle in cycles for a in cycle for b in sorted(edges[a])
              if b in cycle]
    assert not cycles, f"import cycles between subpackages {cycles}:\n" + "\n".join(detail)


def test_no_module_is_over_the_size_limit():
    sizes = {_module_name(p): len(p.read_text().splitlines()) for p in MODULES}
    over = {name: n for name, n in sorted(sizes.items()) if n > MAX_MODULE_LINES}
    assert not over, f"modules over {MAX_MODULE_LINES} lines: {over}"


MAX_FUNCTION_LINES = 70


def test_no_function_is_over_the_size_limit():
    long = []
    for path in MODULES:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long.append(f"{_module_name(path)}.{node.name}: {lines}")
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines: {long}"
