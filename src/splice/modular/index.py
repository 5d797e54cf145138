"""What a module defines at top level, what it imports, and which names each definition uses."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import libcst as cst

Kind = Literal["class", "function", "assignment"]


@dataclass
class Definition:
    name: str
    kind: Kind
    node: cst.CSTNode  # ClassDef, FunctionDef, or the SimpleStatementLine of an assignment
    position: int  # index among the module's top-level statements
    origin: str = ""  # the file it comes from, for ordering and messages


class _NameCollector(cst.CSTVisitor):
    """Names a piece of code refers to: not attribute names, keyword names or parameter names."""

    def __init__(self) -> None:
        self.names: set[str] = set()

    def visit_Name(self, node: cst.Name) -> None:
        self.names.add(node.value)

    def visit_Attribute(self, node: cst.Attribute) -> bool:
        node.value.visit(self)
        return False

    def visit_Arg(self, node: cst.Arg) -> bool:
        node.value.visit(self)
        return False

    def visit_FunctionDef(self, node: cst.FunctionDef) -> bool:
        # The function's own name is a binding, not a use.
        for child in (*node.decorators, node.params, node.returns, node.body):
            if child is not None:
                child.visit(self)
        return False

    def visit_ClassDef(self, node: cst.ClassDef) -> bool:
        for child in (*node.decorators, *node.bases, *node.keywords, node.body):
            child.visit(self)
        return False

    def visit_Param(self, node: cst.Param) -> bool:
        for child in (node.annotation, node.default):
            if child is not None:
                child.visit(self)
        return False


def names_used(node: cst.CSTNode) -> set[str]:
    collector = _NameCollector()
    node.visit(collector)
    return collector.names


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


def is_import_line(statement: cst.CSTNode) -> bool:
    return isinstance(statement, cst.SimpleStatementLine) and all(
        isinstance(small, (cst.Import, cst.ImportFrom)) for small in statement.body
    )


def is_guarded_imports(statement: cst.CSTNode) -> bool:
    """An ``if``/``try`` block at top level whose body imports something (``if is_torch_available():``)."""
    if not isinstance(statement, (cst.If, cst.Try)):
        return False
    return any(is_import_line(inner) for inner in statement.body.body)


@dataclass
class ModuleIndex:
    module: cst.Module
    origin: str
    definitions: dict[str, Definition] = field(default_factory=dict)
    imports: list[cst.CSTNode] = field(default_factory=list)
    _uses: dict[str, set[str]] = field(default_factory=dict, repr=False)

    @classmethod
    def build(cls, module: cst.Module, origin: str = "") -> ModuleIndex:
        index = cls(module, origin)
        for position, statement in enumerate(module.body):
            if isinstance(statement, cst.ClassDef):
                index._add(statement.name.value, "class", statement, position)
            elif isinstance(statement, cst.FunctionDef):
                index._add(statement.name.value, "function", statement, position)
            elif is_import_line(statement) or is_guarded_imports(statement):
                index.imports.append(statement)
            else:
                target = assignment_target(statement)
                if target is not None:
                    index._add(target, "assignment", statement, position)
        return index

    def _add(self, name: str, kind: Kind, node: cst.CSTNode, position: int) -> None:
        previous = self.definitions.get(name)
        # A redefinition replaces the node but the name keeps the place where it first appeared.
        self.definitions[name] = Definition(
            name, kind, node, previous.position if previous else position, self.origin
        )

    def uses(self, name: str) -> set[str]:
        """Top-level names of this module that ``name``'s definition refers to (not itself)."""
        if name not in self._uses:
            self._uses[name] = names_used(self.definitions[name].node) - {name}
        return self._uses[name]
