"""Unrolling ``super().method(...)`` into the parent's body, and explicit ``Base.method(self, ...)`` calls.

The child method's statements before the call come first; then the parent's body, in which an
attribute the child assigns again after the call is replaced in place and one the child deletes
(``del self.x``) is dropped; then the child's remaining statements that the parent body does not
already contain. ``self.post_init()`` stays last, and a ``super().__init__(...)`` that opens the parent's body
still opens the flattened one.
"""

from __future__ import annotations

import re

import libcst as cst

from splice.modular.resolve import dotted_name

_RENDER = cst.Module([])
_COMMENT = re.compile(r"#.*")


def code(node: cst.CSTNode) -> str:
    return _RENDER.code_for_node(node)


def normalized(statement: cst.CSTNode) -> str:
    """A statement's code without comments or blank lines, to spot the same statement twice."""
    text = _COMMENT.sub("", code(statement))
    return "\n".join(line.rstrip() for line in text.strip().splitlines() if line.strip())


def statements_of(block: cst.BaseSuite) -> list[cst.BaseStatement]:
    """The statements of a block; ``class A(B): ...`` on one line gives one ``...`` statement."""
    if isinstance(block, cst.IndentedBlock):
        return list(block.body)
    return [
        cst.SimpleStatementLine([small.with_changes(semicolon=cst.MaybeSentinel.DEFAULT)])
        for small in block.body
    ]


def as_block(block: cst.BaseSuite, body: list[cst.BaseStatement]) -> cst.IndentedBlock:
    if isinstance(block, cst.IndentedBlock):
        return block.with_changes(body=body)
    return cst.IndentedBlock(body=body)


def docstring_statement(body: list[cst.BaseStatement]) -> cst.SimpleStatementLine | None:
    if not body:
        return None
    first = body[0]
    if (
        isinstance(first, cst.SimpleStatementLine)
        and len(first.body) == 1
        and isinstance(first.body[0], cst.Expr)
        and isinstance(first.body[0].value, (cst.SimpleString, cst.ConcatenatedString))
    ):
        return first
    return None


def super_call_name(statement: cst.CSTNode) -> str | None:
    """``f`` when the statement is exactly ``super().f(...)`` or ``return super().f(...)``."""
    if not isinstance(statement, cst.SimpleStatementLine) or len(statement.body) != 1:
        return None
    small = statement.body[0]
    value = small.value if isinstance(small, (cst.Expr, cst.Return)) else None
    if (
        isinstance(value, cst.Call)
        and isinstance(value.func, cst.Attribute)
        and isinstance(value.func.value, cst.Call)
        and isinstance(value.func.value.func, cst.Name)
        and value.func.value.func.value == "super"
        and not value.func.value.args
    ):
        return value.func.attr.value
    return None


def _single_target(statement: cst.CSTNode, kind: type) -> str | None:
    if isinstance(statement, cst.SimpleStatementLine) and len(statement.body) == 1:
        small = statement.body[0]
        if isinstance(small, kind):
            target = small.targets[0].target if isinstance(small, cst.Assign) else small.target
            return code(target).strip()
    return None


def assigned_target(statement: cst.CSTNode) -> str | None:
    return _single_target(statement, cst.Assign)


def deleted_target(statement: cst.CSTNode) -> str | None:
    return _single_target(statement, cst.Del)


class ExplicitBaseCalls(cst.CSTTransformer):
    """``Base.f(self, a)`` inside method ``f`` -> ``super().f(a)``.

    Naming a base explicitly skips the modular parent's version of ``f`` (``nn.Module.__init__(self)``
    instead of ``LlamaAttention.__init__``). Once flattened, that parent's code is gone and the named
    class is an ancestor of the flattened one, so ``super()`` says the same thing.
    """

    def __init__(self, method: str):
        super().__init__()
        self.method = method

    def leave_Call(self, original_node: cst.Call, updated_node: cst.Call) -> cst.Call:
        func = updated_node.func
        if not (isinstance(func, cst.Attribute) and func.attr.value == self.method):
            return updated_node
        owner = dotted_name(func.value)
        if not owner or not owner.split(".")[-1][:1].isupper():
            return updated_node
        args = list(updated_node.args)
        if (
            args
            and isinstance(args[0].value, cst.Name)
            and args[0].value.value == "self"
            and not args[0].keyword
        ):
            args = args[1:]
        return updated_node.with_changes(func=func.with_changes(value=cst.Call(cst.Name("super"))), args=args)


def _move_post_init_last(body: list[cst.BaseStatement], text) -> list[cst.BaseStatement]:
    for i, statement in enumerate(body):
        if "self.post_init(" in text(statement) and i < len(body) - 1:
            return body[:i] + body[i + 1 :] + [statement]
    return body


def unroll(
    child: cst.FunctionDef, parent: cst.FunctionDef | None, explicit_calls: bool = True
) -> cst.FunctionDef:
    """The child method's body with ``super().<same name>(...)`` replaced by the parent's body.

    ``explicit_calls=False`` says the source has no ``Base.<name>(`` call, which skips looking for one.
    """
    name = child.name.value
    statements = statements_of(child.body)
    explicit = ExplicitBaseCalls(name) if explicit_calls else cst.CSTTransformer()
    child_doc = docstring_statement(statements)
    parent_body = statements_of(parent.body) if parent is not None else []
    parent_doc = docstring_statement(parent_body)

    call_at = next((i for i, s in enumerate(statements) if super_call_name(s) == name), None)
    if parent is None or call_at is None:
        body = [s.visit(explicit) for s in statements] if explicit_calls else statements
    else:
        before = [
            s.visit(explicit) if explicit_calls else s
            for s in statements[:call_at]
            if deleted_target(s) is None
        ]
        after = statements[call_at + 1 :]
        reassigned = {assigned_target(s): s for s in after if assigned_target(s) is not None}
        deleted = {deleted_target(s) for s in after if deleted_target(s) is not None}
        merged: list[cst.BaseStatement] = []
        parent_statements = parent_body[1:] if parent_doc is not None else parent_body
        parent_first = parent_statements[0] if parent_statements else None
        for statement in parent_statements:
            target = assigned_target(statement)
            if target in deleted:
                continue
            merged.append(reassigned.get(target, statement) if target is not None else statement)
        memo: dict[int, str] = {}

        def text(node: cst.CSTNode) -> str:
            if id(node) not in memo:
                memo[id(node)] = normalized(node)
            return memo[id(node)]

        seen = {text(s) for s in merged}
        for statement in after:
            if deleted_target(statement) is not None or text(statement) in seen:
                continue
            seen.add(text(statement))
            merged.append(statement.visit(explicit) if explicit_calls else statement)
        merged = _move_post_init_last(merged, text)
        if merged and merged[0] is parent_first and "super().__init__" in text(parent_first):
            # The parent initializes its own base first; that must still happen before anything else.
            head = before[:1] if docstring_statement(before) is not None else []
            body = [*head, merged[0], *before[len(head) :], *merged[1:]]
        else:
            body = before + merged
    if child_doc is None and parent_doc is not None:
        body = [parent_doc, *body]
    if not body:
        body = [cst.SimpleStatementLine([cst.Pass()])]
    return child.with_changes(body=as_block(child.body, body))
