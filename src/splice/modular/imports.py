"""Choosing the imports of a generated file: only what its code uses, each name once.

The pool holds every import the modular file and its parents wrote, in that order. An import is kept
when the generated body reads the name it binds (a dotted ``import a.b`` when the body reads ``a.b``),
including names inside string annotations; a name the body defines itself is never imported. This is
the part of scope analysis that matters here, at a fraction of the cost of libcst's ``ScopeProvider``. Imports under ``if``/``try`` guards stay guarded.
"""

from __future__ import annotations

import ast

import libcst as cst

from splice.modular.index import is_import_line


def bound_name(alias: cst.ImportAlias) -> str:
    if alias.asname is not None and isinstance(alias.asname.name, cst.Name):
        return alias.asname.name.value
    return cst.Module([]).code_for_node(alias.name)


def _dotted(node: ast.expr) -> str:
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name):
        return ""
    return ".".join([node.id, *reversed(parts)])


def _used_import_names(body: list[cst.CSTNode]) -> set[str]:
    """Names the code reads: plain names, dotted chains (``torch.nn.functional``) and the names inside
    string annotations (``"PreTrainedModel"``)."""
    tree = ast.parse(cst.Module(body=body).code)
    names: set[str] = set()
    annotations: list[ast.expr] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Name):
            names.add(node.id)
        elif isinstance(node, ast.Attribute):
            parts = _dotted(node).split(".")
            names.update(".".join(parts[:i]) for i in range(1, len(parts) + 1) if parts[0])
        elif isinstance(node, ast.arg | ast.AnnAssign) and node.annotation is not None:
            annotations.append(node.annotation)
        elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.returns is not None:
            annotations.append(node.returns)
    for annotation in annotations:
        for inner in ast.walk(annotation):
            if isinstance(inner, ast.Constant) and isinstance(inner.value, str):
                try:
                    names |= {
                        n.id for n in ast.walk(ast.parse(inner.value, mode="eval")) if isinstance(n, ast.Name)
                    }
                except SyntaxError:
                    pass
    return names


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
