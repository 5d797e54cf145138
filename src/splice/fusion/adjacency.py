"""Proving, from a module's own forward source, that sibling modules form a chain that can be fused.

A chain fusion (`splice.fusion.chain`) replaces ``a`` by a pass-through and ``b`` by ``b(a(x))``. That
is exact only if the value ``a`` returns is used by ``b`` and by nothing else: a decoder layer that
keeps the norm's output as its residual (MiniMax: ``hidden_states = norm(h); residual =
hidden_states; hidden_states = moe(hidden_states)``) or adds it to something first (post-norm layouts:
OLMo 2, EXAONE 4: ``h = norm(attn_out); h = residual + h; ...; h = mlp(h)``) would silently change, as
would a model that reads ``a``'s weight somewhere else (Zaya: ``norm(x.to(norm.weight.dtype))``).
So the proof is made once, when fusing, from the parent's ``forward`` source (``ast``):

1. every member is referred to exactly once in ``forward``, as a call ``self.<name>(...)``, and in no
   other method of the class except ``__init__``;
2. either a member's call is the next one's first argument (``self.mlp(self.norm(x))``), or the calls
   are statements of one block, in chain order, and each one but the last is a plain assignment
   ``v = self.<name>(...)``;
3. ``v`` is not touched between that statement and the next member's call, which takes ``v`` as its
   first argument and mentions it nowhere else;
4. after that call ``v`` is not read again before it is rebound.

Anything else (source unavailable, the calls inside a loop, a second reference) is not proven, and the
reason names the statement that breaks it.
"""

from __future__ import annotations

import ast
import functools
import inspect
import textwrap
from collections.abc import Sequence

from torch import nn


def why_not_chain(parent: nn.Module, names: Sequence[str]) -> str | None:
    """None when ``parent.forward`` provably feeds each member's output only to the next one; else why not.

    Branches on the module's own flags (``if self.use_parallel_residual:``) are taken as this instance
    takes them, since those flags are fixed when the module is built.
    """
    forward = _function(type(parent), "forward")
    flags = () if forward is None else tuple(sorted(_flags(forward, parent).items()))
    return _prove(type(parent), tuple(names), flags)


def _static(test: ast.AST, module: nn.Module) -> bool | None:
    """The value of ``self.flag`` / ``self.config.flag`` / ``not ...`` on this module, if it is a bool."""
    if isinstance(test, ast.UnaryOp) and isinstance(test.op, ast.Not):
        inner = _static(test.operand, module)
        return None if inner is None else not inner
    chain: list[str] = []
    node = test
    while isinstance(node, ast.Attribute):
        chain.append(node.attr)
        node = node.value
    if not (isinstance(node, ast.Name) and node.id == "self" and chain):
        return None
    value: object = module
    for attr in reversed(chain):
        value = getattr(value, attr, _MISSING)
        if value is _MISSING or isinstance(value, nn.Module) and attr == chain[0]:
            return None
    return value if isinstance(value, bool) else None


_MISSING = object()


def _flags(forward: ast.AST, module: nn.Module) -> dict[str, bool]:
    out = {}
    for node in ast.walk(forward):
        if isinstance(node, ast.If) and (value := _static(node.test, module)) is not None:
            out[ast.unparse(node.test)] = value
    return out


def _prune(body: list[ast.stmt], flags: dict[str, bool]) -> list[ast.stmt]:
    """``body`` with each ``if <flag>:`` replaced by the branch this instance takes."""
    out: list[ast.stmt] = []
    for statement in body:
        if isinstance(statement, ast.If) and ast.unparse(statement.test) in flags:
            taken = _prune(statement.body if flags[ast.unparse(statement.test)] else statement.orelse, flags)
            out.extend(taken)
            if taken and isinstance(taken[-1], (ast.Return, ast.Raise)):
                break  # the rest of the block is unreachable
            continue
        for field in ("body", "orelse", "finalbody"):
            block = getattr(statement, field, None)
            if isinstance(block, list) and block and isinstance(block[0], ast.stmt):
                setattr(statement, field, _prune(block, flags) or [ast.Pass()])
        out.append(statement)
    return out


@functools.lru_cache(maxsize=256)
def _prove(cls: type, names: tuple[str, ...], flags: tuple[tuple[str, bool], ...] = ()) -> str | None:
    forward = _function(cls, "forward")
    if forward is not None and flags:
        forward.body = _prune(forward.body, dict(flags))
        _link_parents(forward)
    if forward is None:
        return f"the source of {cls.__name__}.forward is not available to check that {' -> '.join(names)} are adjacent"
    for method, node in _other_methods(cls):
        for name in names:
            if _self_refs(node, name):
                return f"{cls.__name__}.{method} refers to self.{name}, which fusing replaces"
    body = forward.body
    located: list[tuple[list[ast.stmt], int, ast.Call]] = []
    for name in names:
        refs = _self_refs(forward, name)
        if len(refs) != 1:
            return f"{cls.__name__}.forward refers to self.{name} {len(refs)} times (expected one call)"
        found = _statement_of(body, refs[0])
        if found is None or not isinstance(refs[0].parent, ast.Call) or refs[0].parent.func is not refs[0]:  # type: ignore[attr-defined]
            return f"{cls.__name__}.forward uses self.{name} other than as a plain call"
        located.append((*found, refs[0].parent))  # type: ignore[attr-defined]
    for i in range(len(names) - 1):
        (block, index, call), (next_block, next_index, next_call) = located[i], located[i + 1]
        if (
            next_call.args and next_call.args[0] is call
        ):  # self.mlp(self.norm(x), ...): adjacent by construction
            continue
        statement = block[index]
        where = f"{cls.__name__}.forward"
        if next_block is not block or next_index <= index:
            return f"{where}: self.{names[i + 1]} is not called after self.{names[i]} in the same block"
        if not (
            isinstance(statement, ast.Assign)
            and len(statement.targets) == 1
            and isinstance(statement.targets[0], ast.Name)
        ):
            return f"{where}: the output of self.{names[i]} is not assigned to one variable: `{ast.unparse(statement)}`"
        var = statement.targets[0].id
        for between in block[index + 1 : next_index]:
            if _mentions(between, var):
                return (
                    f"{where}: the output of self.{names[i]} ({var}) is used by `{ast.unparse(between)}` "
                    f"before self.{names[i + 1]}, so they are not adjacent"
                )
        args = next_call.args
        if not args or not (isinstance(args[0], ast.Name) and args[0].id == var):
            return f"{where}: self.{names[i + 1]} does not take the output of self.{names[i]} ({var}) as its first argument"
        next_statement = next_block[next_index]
        if (
            sum(
                1
                for n in ast.walk(next_statement)
                if isinstance(n, ast.Name) and n.id == var and isinstance(n.ctx, ast.Load)
            )
            != 1
        ):
            return (
                f"{where}: `{ast.unparse(next_statement)}` reads {var} (the output of self.{names[i]}) twice"
            )
        if not _rebinds(next_statement, var):
            for after in block[next_index + 1 :]:
                if _reads(after, var):
                    return (
                        f"{where}: the output of self.{names[i]} ({var}) is read again by `{ast.unparse(after)}` "
                        f"after self.{names[i + 1]}, so fusing would change it"
                    )
                if _rebinds(after, var):
                    break
    return None


def why_carried_over(classes: Sequence[type], names: Sequence[str]) -> str | None:
    """None unless a method of one of ``classes`` hands children ``names`` over to another module by name.

    BigBird's ``set_attention_type`` (run by its forward when a sequence is short) builds a new attention
    module and copies ``query``, ``key`` and ``value`` onto it: stand-ins would move, the fused Linear
    they read from would be left out of the model.
    """
    for cls in dict.fromkeys(classes):
        found = _carries(cls, frozenset(names))
        if found is not None:
            return found
    return None


@functools.lru_cache(maxsize=256)
def _carries(cls: type, names: frozenset[str]) -> str | None:
    methods = [("forward", node)] if (node := _function(cls, "forward")) is not None else []
    for method, node in [*methods, *_other_methods(cls)]:
        for statement in ast.walk(node):
            if not isinstance(statement, ast.Assign) or not isinstance(statement.value, ast.Attribute):
                continue
            name = statement.value.attr
            if name in names and any(
                isinstance(t, ast.Attribute) and t.attr == name for t in statement.targets
            ):
                return (
                    f"{cls.__name__}.{method} moves {name} onto another module (`{ast.unparse(statement)}`), which "
                    "would leave the fused module behind"
                )
    return None


def _function(cls: type, name: str) -> ast.FunctionDef | None:
    function = inspect.unwrap(getattr(cls, name, None))
    try:
        source = textwrap.dedent(inspect.getsource(function))
    except (OSError, TypeError):
        return None
    try:
        tree = ast.parse(source)
    except SyntaxError:  # a method defined by assignment or in a one-liner: not a def to read
        return None
    node = tree.body[0] if tree.body else None
    if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
        return None
    _link_parents(node)
    return node  # type: ignore[return-value]


def _other_methods(cls: type) -> list[tuple[str, ast.AST]]:
    """The methods of ``cls`` but ``__init__`` and ``forward``: those written in its modeling file.

    Methods inherited from shared bases (``PreTrainedModel``, ``GenerationMixin``, torch) are generic code
    that does not know the model's children by name, so they are not read.
    """
    out = []
    for name in dir(cls):
        if name in ("__init__", "forward") or name.startswith("__"):
            continue
        member = inspect.getattr_static(cls, name, None)
        if not inspect.isfunction(member):
            continue
        owner = next((k for k in cls.__mro__ if name in vars(k)), None)
        if owner is None or owner.__module__ != cls.__module__:
            continue
        node = _function(cls, name)
        if node is not None:
            out.append((name, node))
    return out


def _link_parents(root: ast.AST) -> None:
    for node in ast.walk(root):
        for child in ast.iter_child_nodes(node):
            child.parent = node  # type: ignore[attr-defined]


def _self_refs(root: ast.AST, name: str) -> list[ast.Attribute]:
    return [
        n
        for n in ast.walk(root)
        if isinstance(n, ast.Attribute)
        and n.attr == name
        and isinstance(n.value, ast.Name)
        and n.value.id == "self"
    ]


def _statement_of(body: list[ast.stmt], node: ast.AST) -> tuple[list[ast.stmt], int] | None:
    """The statement list and index of the statement that contains ``node``."""
    child = node
    parent = getattr(node, "parent", None)
    while parent is not None:
        for field in ("body", "orelse", "finalbody"):
            block = getattr(parent, field, None)
            if isinstance(block, list) and child in block:
                return block, block.index(child)
        child, parent = parent, getattr(parent, "parent", None)
    return None


def _mentions(statement: ast.AST, var: str) -> bool:
    return any(isinstance(n, ast.Name) and n.id == var for n in ast.walk(statement))


def _reads(statement: ast.AST, var: str) -> bool:
    if (
        isinstance(statement, ast.AugAssign)
        and isinstance(statement.target, ast.Name)
        and statement.target.id == var
    ):
        return True
    return any(
        isinstance(n, ast.Name) and n.id == var and isinstance(n.ctx, ast.Load) for n in ast.walk(statement)
    )


def _rebinds(statement: ast.stmt, var: str) -> bool:
    """A plain assignment whose targets include ``var`` (unpacking counts)."""
    if not isinstance(statement, (ast.Assign, ast.AnnAssign)):
        return False
    targets = statement.targets if isinstance(statement, ast.Assign) else [statement.target]
    return any(
        isinstance(n, ast.Name) and n.id == var and isinstance(n.ctx, ast.Store)
        for t in targets
        for n in ast.walk(t)
    )


__all__ = ["why_carried_over", "why_not_chain"]
