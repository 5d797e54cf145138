"""Choosing the imports of a generated file: only what its code uses, each name once.

The pool holds every import the modular file and its parents wrote, in that order. An import is kept
when the generated body reads the name it binds (a dotted ``import a.b`` when the body reads ``a.b``),
including names inside string annotations; a name the body defines itself is never imported. This is
the part of scope analysis that matters here, at a fraction of the cost of libcst's ``ScopeProvider``. Imports under ``if``/``try`` guards stay guarded.
"""

from __future__ import annotations

import libcst as cst
from libcst import matchers as m

from splice.modular.index import is_import_line
from splice.modular.resolve import dotted_name


def bound_name(alias: cst.ImportAlias) -> str:
    if alias.asname is not None and isinstance(alias.asname.name, cst.Name):
        return alias.asname.name.value
    return cst.Module([]).code_for_node(alias.name)


class _ReadNames(cst.CSTVisitor):
    """Names the code reads: plain names, dotted chains (``torch.nn.functional``) and the names inside
    string annotations (``"PreTrainedModel"``)."""

    def __init__(self) -> None:
        self.names: set[str] = set()

    def visit_Name(self, node: cst.Name) -> None:
        self.names.add(node.value)

    def visit_Attribute(self, node: cst.Attribute) -> bool:
        chain = dotted_name(node)
        if chain:
            parts = chain.split(".")
            self.names.update(".".join(parts[:i]) for i in range(1, len(parts) + 1))
            return False
        node.value.visit(self)
        return False

    def visit_Arg(self, node: cst.Arg) -> bool:
        node.value.visit(self)
        return False

    def visit_Annotation(self, node: cst.Annotation) -> None:
        for string in m.findall(node, m.SimpleString()):
            try:
                cst.parse_expression(string.evaluated_value).visit(self)
            except (cst.ParserSyntaxError, TypeError, ValueError):
                pass


def _used_import_names(body: list[cst.CSTNode]) -> set[str]:
    reader = _ReadNames()
    for statement in body:
        statement.visit(reader)
    return reader.names


class _Picker:
    def __init__(self, used: set[str], defined: set[str]):
        self.used = used
        self.defined = defined
        self.taken: set[str] = set()

    def line(self, statement: cst.SimpleStatementLine) -> cst.SimpleStatementLine | None:
        smalls = []
        for small in statement.body:
            if isinstance(small, cst.ImportFrom) and isinstance(small.names, cst.ImportStar):
                continue  # a star import cannot be checked for use; generated files never need one
            keep = []
            for alias in small.names:
                name = bound_name(alias)
                if name in self.used and name not in self.defined and name not in self.taken:
                    self.taken.add(name)
                    keep.append(alias.with_changes(comma=cst.MaybeSentinel.DEFAULT))
            if keep:
                smalls.append(small.with_changes(names=keep))
        return statement.with_changes(body=smalls) if smalls else None

    def guarded(self, block: cst.If | cst.Try) -> cst.CSTNode | None:
        body, kept_any = [], False
        for inner in block.body.body:
            if is_import_line(inner):
                picked = self.line(inner)
                if picked is not None:
                    body.append(picked)
                    kept_any = True
            else:
                body.append(inner)
        if not kept_any:
            return None
        return block.with_changes(body=block.body.with_changes(body=body))


def needed_imports(pool: list[cst.CSTNode], body: list[cst.CSTNode], defined: set[str]) -> list[cst.CSTNode]:
    """The imports of ``pool`` that ``body`` needs: plain ones first, then guarded blocks."""
    used = _used_import_names(body)
    picker = _Picker(used, defined)
    plain, guarded, seen_blocks = [], [], set()
    for statement in pool:
        if isinstance(statement, cst.SimpleStatementLine):
            picked = picker.line(statement)
            if picked is not None:
                plain.append(picked)
    for statement in pool:
        if isinstance(statement, (cst.If, cst.Try)):
            picked = picker.guarded(statement)
            if picked is not None:
                text = cst.Module([]).code_for_node(picked).strip()
                if text not in seen_blocks:
                    seen_blocks.add(text)
                    guarded.append(picked)
    return [*plain, *guarded]
