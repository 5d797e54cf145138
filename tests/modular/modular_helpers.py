"""Small helpers shared by the modular tests: comparing generated code by AST."""

from __future__ import annotations

import ast
import textwrap


def definitions(source: str) -> dict[str, str]:
    """``name -> normalized code`` of each top-level class, function and assignment, in file order."""
    result = {}
    for node in ast.parse(source).body:
        name = getattr(node, "name", None)
        if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name):
            name = node.targets[0].id
        if name is not None:
            result[name] = ast.unparse(node)
    return result


def code(text: str) -> str:
    """``text`` normalized the way :func:`definitions` normalizes (formatting and comments dropped)."""
    return ast.unparse(ast.parse(textwrap.dedent(text)))


def imports(source: str) -> list[str]:
    """Every import statement of the module, normalized, including those nested in ``if`` blocks."""
    return [
        ast.unparse(node)
        for node in ast.walk(ast.parse(source))
        if isinstance(node, (ast.Import, ast.ImportFrom))
    ]


def methods(source: str, class_name: str) -> dict[str, str]:
    """``method name -> normalized code`` for the methods of one top-level class."""
    for node in ast.parse(source).body:
        if isinstance(node, ast.ClassDef) and node.name == class_name:
            return {f.name: ast.unparse(f) for f in node.body if isinstance(f, ast.FunctionDef)}
    raise KeyError(class_name)
