"""What a module defines at top level, what it imports, and which names each definition uses.

Parent files can be large (a few thousand lines) while a modular file needs a handful of their
definitions, so a parent is indexed with Python's own fast ``ast`` parser: positions, kinds and used
names come from there, and a definition is parsed into libcst nodes only when it is actually needed.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass, field
from typing import Literal

import libcst as cst

Kind = Literal["class", "function", "assignment", "statement"]
# The name a top-level statement that binds nothing is indexed under (`REGISTRY["x"] = f`).
UNNAMED = "<statement {position}>"


class Definition:
    """A top-level class, function or ``NAME = ...`` assignment of some file; in the modular file, also any
    other top-level statement (``if ...: X = 1``, ``type X = int``, ``REGISTRY["x"] = f``)."""

    __slots__ = ("name", "kind", "_node", "position", "origin", "source", "ast_node")

    def __init__(
        self,
        name: str,
        kind: Kind,
        node: cst.CSTNode | None,
        position: int,
        origin: str = "",
        source: str | None = None,
        ast_node: ast.AST | None = None,
    ):
        self.name = name
        self.kind = kind
        self._node = node  # ClassDef, FunctionDef, or the SimpleStatementLine of an assignment
        self.position = position  # index among the file's top-level statements
        self.origin = origin  # the file it comes from
        self.source = source  # its text, parsed on first use when no node was given
        self.ast_node = ast_node  # its CPython AST, when the file was indexed from text

    @property
    def node(self) -> cst.CSTNode:
        if self._node is None:
            self._node = cst.parse_statement(self.source)
        return self._node


def ast_names(tree: ast.AST) -> set[str]:
    """Names read or bound in ``tree`` (not attribute, keyword, parameter or definition names), and
    the names inside string annotations (``config: "LlamaConfig"``)."""
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Name):
            names.add(node.id)
        elif isinstance(node, ast.arg | ast.AnnAssign) and isinstance(node.annotation, ast.Constant):
            names |= _string_annotation(node.annotation.value)
        elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and isinstance(
            node.returns, ast.Constant
        ):
            names |= _string_annotation(node.returns.value)
    return names


def _string_annotation(value: object) -> set[str]:
    if not isinstance(value, str):
        return set()
    try:
        return {n.id for n in ast.walk(ast.parse(value, mode="eval")) if isinstance(n, ast.Name)}
    except SyntaxError:
        return set()


def names_used(node: cst.CSTNode, text: str | None = None) -> set[str]:
    """:func:`ast_names` of a libcst node (rendered, then parsed by CPython: much faster than a visitor)."""
    if text is None:
        text = cst.Module([]).code_for_node(node)
    try:
        return ast_names(ast.parse(text))
    except SyntaxError:  # a fragment that only parses in context; not expected for top-level code
        return set()


def assignment_target(statement: cst.CSTNode) -> str | None:
    """``X`` for a top-level ``X = ...`` or ``X: T = ...`` line, else None."""
    if not isinstance(statement, cst.SimpleStatementLine) or len(statement.body) != 1:
        return None
    small = statement.body[0]
    if (
        isinstance(small, cst.Assign)
        and len(small.targets) == 1
        and isinstance(small.targets[0].target, cst.Name)
    ):
        return small.targets[0].target.value
    if isinstance(small, cst.AnnAssign) and isinstance(small.target, cst.Name) and small.value is not None:
        return small.target.value
    return None


def _is_docstring(statement: cst.CSTNode) -> bool:
    return (
        isinstance(statement, cst.SimpleStatementLine)
        and len(statement.body) == 1
        and isinstance(statement.body[0], cst.Expr)
        and isinstance(statement.body[0].value, (cst.SimpleString, cst.ConcatenatedString))
    )


def statement_bindings(statement: cst.CSTNode) -> list[str]:
    """The module-level names a top-level statement binds (``if ...: X = 1`` -> ``["X"]``), in order."""
    if isinstance(statement, cst.SimpleStatementLine) and isinstance(statement.body[0], cst.TypeAlias):
        return [statement.body[0].name.value]  # `type X = int`: CPython < 3.12 cannot parse it
    try:
        tree = ast.parse(cst.Module([]).code_for_node(statement))
    except SyntaxError:
        return []
    names: list[str] = []

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                names.append(child.name)  # its body is a scope of its own
            elif isinstance(child, (ast.Lambda, ast.ListComp, ast.SetComp, ast.DictComp, ast.GeneratorExp)):
                continue
            else:
                if isinstance(child, ast.Name) and isinstance(child.ctx, ast.Store):
                    names.append(child.id)
                visit(child)

    visit(tree)
    return list(dict.fromkeys(names))


def is_import_line(statement: cst.CSTNode) -> bool:
    return isinstance(statement, cst.SimpleStatementLine) and all(
        isinstance(small, (cst.Import, cst.ImportFrom)) for small in statement.body
    )


def is_guarded_imports(statement: cst.CSTNode) -> bool:
    """An ``if``/``try`` block at top level whose body imports something (``if is_torch_available():``)."""
    if not isinstance(statement, (cst.If, cst.Try)):
        return False
    return any(is_import_line(inner) for inner in statement.body.body)


def _ast_kind(node: ast.stmt) -> tuple[str, Kind] | None:
    if isinstance(node, ast.ClassDef):
        return node.name, "class"
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
        return node.name, "function"
    if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
        return node.targets[0].id, "assignment"
    if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and node.value is not None:
        return node.target.id, "assignment"
    return None


def _ast_imports(node: ast.stmt) -> bool:
    if isinstance(node, (ast.Import, ast.ImportFrom)):
        return True
    if isinstance(node, (ast.If, ast.Try)):
        return any(isinstance(inner, (ast.Import, ast.ImportFrom)) for inner in node.body)
    return False


@dataclass
class ModuleIndex:
    origin: str
    module: cst.Module | None = None  # the whole file, for the modular file only
    definitions: dict[str, Definition] = field(default_factory=dict)
    imports: list[cst.CSTNode] = field(default_factory=list)
    class_names: set[str] = field(default_factory=set)
    _uses: dict[str, set[str]] = field(default_factory=dict, repr=False)

    @classmethod
    def build(cls, module: cst.Module, origin: str = "") -> ModuleIndex:
        """Index a fully parsed module (the modular file)."""
        index = cls(origin, module)
        for position, statement in enumerate(module.body):
            if isinstance(statement, cst.ClassDef):
                index._add(Definition(statement.name.value, "class", statement, position, origin))
            elif isinstance(statement, cst.FunctionDef):
                index._add(Definition(statement.name.value, "function", statement, position, origin))
            elif is_import_line(statement) or is_guarded_imports(statement):
                index.imports.append(statement)
            elif (target := assignment_target(statement)) is not None:
                index._add(Definition(target, "assignment", statement, position, origin))
            elif position > 0 or not _is_docstring(statement):
                # Kept too: each name it binds finds it, and one that binds none is always emitted.
                names = statement_bindings(statement) or [UNNAMED.format(position=position)]
                for name in names:
                    index._add(Definition(name, "statement", statement, position, origin))
        return index

    @classmethod
    def from_source(cls, source: str, origin: str = "", tree: ast.Module | None = None) -> ModuleIndex:
        """Index a parent file from its text (and its ``ast`` parse, if done): libcst parses each definition
        on first use only."""
        index = cls(origin)
        lines = source.splitlines(keepends=True)
        import_texts: list[str] = []
        for position, node in enumerate((tree or ast.parse(source)).body):
            start = min([node.lineno, *(d.lineno for d in getattr(node, "decorator_list", ()))])
            while start > 1 and lines[start - 2].lstrip().startswith("#"):
                start -= 1  # comments right above belong to the definition
            text = "".join(lines[start - 1 : node.end_lineno])
            if _ast_imports(node):
                import_texts.append(text if text.endswith("\n") else text + "\n")
                continue
            found = _ast_kind(node)
            if found is not None:
                name, kind = found
                index._add(Definition(name, kind, None, position, origin, source=text, ast_node=node))
        if import_texts:  # one parse for all of them: much cheaper than one per statement
            index.imports = list(cst.parse_module("".join(import_texts)).body)
        return index

    def _add(self, definition: Definition) -> None:
        previous = self.definitions.get(definition.name)
        if previous is not None:  # a redefinition replaces the node but keeps the first place
            definition.position = previous.position
        self.definitions[definition.name] = definition
        if definition.kind == "class":
            self.class_names.add(definition.name)

    def uses(self, name: str) -> set[str]:
        """Names that ``name``'s definition refers to (not itself)."""
        if name not in self._uses:
            definition = self.definitions[name]
            found = (
                ast_names(definition.ast_node)
                if definition.ast_node is not None
                else names_used(definition.node)
            )
            self._uses[name] = set(found) - {name}
        return self._uses[name]
