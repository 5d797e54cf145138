"""Choosing the imports of a generated file: only what its code uses, each name once.

The pool holds every import the modular file and its parents wrote, in that order. An import is kept
when a definition of the file reads the name it binds (names come from CPython's AST of each
definition, string annotations included; ``import a.b`` counts as used when ``a`` is read). A name the
file defines itself is never imported. Imports under ``if``/``try`` guards stay guarded. This is the part
of scope analysis that matters here, at a fraction of the cost of libcst's ``ScopeProvider``.

A parent's relative imports were written for the parent's package. :func:`reanchor` keeps one as it is
when it reaches the same module from the generated file's package (``from ...activations import
ACT2FN`` from ``transformers.models.llama`` to ``transformers.models.olmo2``) and otherwise makes it
absolute (``from transformers.activations import ACT2FN`` for a file generated outside transformers).
"""

from __future__ import annotations

import libcst as cst

from splice.modular.index import is_import_line
from splice.modular.resolve import dotted_name, is_model_file


def bound_name(alias: cst.ImportAlias) -> str:
    if alias.asname is not None and isinstance(alias.asname.name, cst.Name):
        return alias.asname.name.value
    return cst.Module([]).code_for_node(alias.name)


def _resolved(package: tuple[str, ...], level: int, module: str) -> tuple[str, ...] | None:
    """The absolute module ``from <level dots><module> import ...`` names inside ``package``."""
    if level > len(package):
        return None  # climbs above the top-level package: Python rejects it too
    base = package[: len(package) - (level - 1)]
    return base + tuple(module.split(".")) if module else base


class _Reanchor(cst.CSTTransformer):
    def __init__(self, written_in: tuple[str, ...], used_in: tuple[str, ...]):
        self.written_in = written_in
        self.used_in = used_in

    def leave_ImportFrom(self, original: cst.ImportFrom, updated: cst.ImportFrom) -> cst.ImportFrom:
        level, module = len(updated.relative), dotted_name(updated.module)
        if level == 0 or (level == 1 and is_model_file(module)):
            return updated  # absolute, or a sibling model file: renamed to a generated file
        target = _resolved(self.written_in, level, module)
        if target is None or target == _resolved(self.used_in, level, module):
            return updated
        return updated.with_changes(relative=[], module=cst.parse_expression(".".join(target)))


def reanchor(statement: cst.CSTNode, written_in: tuple[str, ...], used_in: tuple[str, ...]) -> cst.CSTNode:
    """``statement``'s relative imports, written in package ``written_in``, as they must read in
    package ``used_in``: unchanged where they reach the same module, else absolute."""
    if written_in == used_in:
        return statement
    return statement.visit(_Reanchor(written_in, used_in))


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
                if name.split(".")[0] in self.used and name not in self.defined and name not in self.taken:
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


def needed_imports(pool: list[cst.CSTNode], used: set[str], defined: set[str]) -> list[cst.CSTNode]:
    """The imports of ``pool`` binding a name in ``used`` and not in ``defined``: plain ones first,
    then guarded blocks."""
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
