"""The shape of the source tree: no import cycles (lazy imports count), no oversized module, layers in order.

DESIGN.md: each layer imports only the layers below it. The graph is read from the source with `ast`, so an
import inside a function counts the same as one at the top; importing ``a.b.c`` counts as importing the
packages ``a`` and ``a.b`` too (Python runs their ``__init__``), except from inside those packages.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "splice"
MAX_LINES = 450

# the layers of DESIGN.md, lowest first; a module may import its own layer and those before it
LAYERS = [
    {"errors", "tensors"},
    {"transforms"},
    {"weightmap"},
    {"checkpoint"},
    {"tools"},
    {"loading"},
    {"fusion"},
    {"kernels"},
    {"parallel"},
    {"peft"},
    {"hf"},
    {"inspection", "convert"},
    {"demo", "cli", "__init__", "__main__"},  # demo uses the public facade, as a user would
]
STANDALONE = {"modular"}  # libcst only: imports nothing of splice but itself and errors


def _modules() -> dict[str, Path]:
    found = {}
    for path in SRC.rglob("*.py"):
        parts = ["splice", *path.relative_to(SRC).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
        deps: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = package[: len(package) - node.level + 1] if node.level else []
                stem = ".".join(base + ([node.module] if node.module else []))
                targets = [f"{stem}.{a.name}" if f"{stem}.{a.name}" in modules else stem for a in node.names]
            for target in targets:
                while target and target not in modules:
                    target = target.rpartition(".")[0]
                if not target or target == name:
                    continue
                deps.add(target)
                parts = target.split(".")
                for i in range(2, len(parts)):
                    parent = ".".join(parts[:i])
                    if parent in modules and not (name + ".").startswith(parent + "."):
                        deps.add(parent)
        graph[name] = deps
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def _layer(module: str) -> int | None:
    top = module.split(".")[1] if "." in module else "__init__"
    for rank, names in enumerate(LAYERS):
        if top in names:
            return rank
    return None


def test_there_is_no_import_cycle():
    assert _cycles(_graph()) == []


def test_the_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_module_is_over_the_line_limit():
    sizes = {name: len(path.read_text().splitlines()) for name, path in _modules().items()}
    assert {name: n for name, n in sizes.items() if n > MAX_LINES} == {}


def test_every_module_sits_in_a_layer():
    unplaced = sorted(m for m in _modules() if _layer(m) is None and m.split(".")[1] not in STANDALONE)
    assert unplaced == []


def test_layers_import_only_downward():
    upward = []
    for module, deps in _graph().items():
        if module.split(".")[1:2] and module.split(".")[1] in STANDALONE:
            upward += [(module, d) for d in deps if d.split(".")[1] not in STANDALONE | {"errors"}]
            continue
        rank = _layer(module)
        upward += [(module, d) for d in deps if rank is not None and (_layer(d) or 0) > rank]
    assert upward == []


@pytest.mark.parametrize("package", ["modular"])
def test_the_modular_converter_never_imports_torch(package):
    for path in (SRC / package).rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
                assert not any(n == "torch" or n.startswith("torch.") for n in names), path
