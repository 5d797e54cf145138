"""Flattening one level of inheritance: a modular class merged into its (renamed) parent class.

The result keeps the parent's layout: its docstring, then its class attributes (the modular file's
values win, new ones come after, ``attr = AttributeError()`` removes one), then its methods in order
(a redefined method takes the parent's place, a method whose body raises ``...Error`` is dropped),
then the methods only the modular file defines.
"""

from __future__ import annotations

from collections.abc import Callable

import libcst as cst

from splice.modular.names import NameSwap
from splice.modular.rename import rename_node
from splice.modular.resolve import dotted_name, find_all
from splice.modular.supercalls import (
    as_block,
    code,
    docstring_statement,
    statements_of,
    super_call_name,
    unroll,
)


def common_suffix(a: str, b: str) -> str:
    """The longest common suffix of ``a`` and ``b``, or '' when it is the whole of either."""
    size = 0
    while size < min(len(a), len(b)) and a[-1 - size] == b[-1 - size]:
        size += 1
    suffix = a[len(a) - size :] if size else ""
    return "" if suffix in (a, b) else suffix


def is_error_stub(function: cst.FunctionDef) -> bool:
    """A method whose body starts with ``raise SomethingError(...)``: the modular file removes it."""
    body = statements_of(function.body)
    if not body:
        return False
    first = body[0]
    if not (isinstance(first, cst.SimpleStatementLine) and isinstance(first.body[0], cst.Raise)):
        return False
    raised = first.body[0].exc
    if isinstance(raised, cst.Call):
        raised = raised.func
    return dotted_name(raised).endswith("Error")


def _attribute_name(statement: cst.CSTNode) -> str | None:
    if not isinstance(statement, cst.SimpleStatementLine) or len(statement.body) != 1:
        return None
    small = statement.body[0]
    if isinstance(small, cst.Assign):
        return code(small.targets[0].target).strip()
    if isinstance(small, cst.AnnAssign):
        return code(small.target).strip()
    return None


def _removes_attribute(statement: cst.CSTNode) -> bool:
    """``attr = AttributeError()``: the attribute is deleted from the flattened class."""
    small = statement.body[0]
    value = getattr(small, "value", None)
    return isinstance(value, cst.Call) and dotted_name(value.func) == "AttributeError"


def _is_super_call(node: cst.CSTNode, name: str) -> bool:
    """``super().name(...)``."""
    if (
        not isinstance(node, cst.Call)
        or not isinstance(node.func, cst.Attribute)
        or node.func.attr.value != name
    ):
        return False
    inner = node.func.value
    return isinstance(inner, cst.Call) and not inner.args and dotted_name(inner.func) == "super"


def _is_placeholder(statement: cst.CSTNode) -> bool:
    """``pass`` or ``...`` alone on a line: a body with nothing in it yet."""
    if not isinstance(statement, cst.SimpleStatementLine) or len(statement.body) != 1:
        return False
    small = statement.body[0]
    return isinstance(small, cst.Pass) or (
        isinstance(small, cst.Expr) and isinstance(small.value, cst.Ellipsis)
    )


def method_key(function: cst.FunctionDef) -> str:
    """A property's getter and setter share a name; the key tells them apart."""
    for decorator in function.decorators:
        target = decorator.decorator
        if isinstance(target, cst.Attribute) and target.attr.value in ("setter", "getter", "deleter"):
            return f"{function.name.value}.{target.attr.value}"
    return function.name.value


def expand_super_kwargs(child: cst.FunctionDef, parent: cst.FunctionDef) -> cst.Parameters:
    """``def f(self, **super_kwargs)`` takes the parent's full signature (named parameters may be overridden)."""
    star = child.params.star_kwarg
    if star is None or star.name.value != "super_kwargs":
        return child.params
    merged = {p.name.value: p for p in parent.params.params}
    merged.update({p.name.value: p for p in child.params.params[1:]})
    return parent.params.with_changes(params=list(merged.values()))


def _switch_bases(parent: cst.ClassDef, extra_bases: list[str]) -> list[cst.Arg]:
    """A parent base is swapped for a child's extra base with the same suffix (``PreTrainedModel`` ->
    ``MyVisionPreTrainedModel``)."""
    bases = []
    for base in parent.bases:
        if isinstance(base.value, cst.Name):
            for extra in extra_bases:
                suffix = common_suffix(base.value.value, extra)
                if suffix and suffix[0].isupper():
                    base = base.with_changes(value=cst.Name(extra))
                    break
        bases.append(base)
    return bases


def merge_class(
    child: cst.ClassDef,
    parent: cst.ClassDef,
    parent_base: str,
    doc_swap: Callable[[str, str], NameSwap | None],
    note: Callable[[cst.CSTNode, str], None] = lambda node, message: None,
    explicit_calls: Callable[[str], bool] = lambda method: True,
) -> cst.ClassDef:
    """The parent class with the child's name, attributes and methods merged in."""
    child_name, parent_name = child.name.value, parent.name.value
    if child_name != parent_name:
        suffix = common_suffix(child_name, parent_name)
        old = parent_name.removesuffix(suffix) if suffix else parent_name
        swap = doc_swap(old, child_name.removesuffix(suffix) if suffix else child_name)
        if swap is not None:
            parent = rename_node(parent, swap, only_text=True)

    child_bases = [dotted_name(arg.value) for arg in child.bases]
    extra_bases = [b for b in child_bases if b and b != parent_base]
    new_bases = _switch_bases(parent, extra_bases)

    child_body = statements_of(child.body)
    parent_body = statements_of(parent.body)
    child_methods = {method_key(f): f for f in child_body if isinstance(f, cst.FunctionDef)}
    parent_methods = {method_key(f): f for f in parent_body if isinstance(f, cst.FunctionDef)}

    docstring = docstring_statement(child_body) or docstring_statement(parent_body)
    attributes: dict[str, cst.CSTNode] = {}
    removed: set[str] = set()
    others: list[cst.BaseStatement] = []
    for statement in parent_body[1:] if docstring_statement(parent_body) else parent_body:
        if isinstance(statement, cst.FunctionDef):
            key = method_key(statement)
            if key in child_methods:
                replacement = child_methods[key]
                if is_error_stub(replacement):
                    continue
                statement = _override(statement, replacement, note, explicit_calls)
            others.append(statement)
        elif (name := _attribute_name(statement)) is not None:
            attributes[name] = statement
        elif not _is_placeholder(statement):
            others.append(statement)
    for statement in child_body:
        if isinstance(statement, cst.FunctionDef):
            if method_key(statement) not in parent_methods:
                others.append(unroll(_own_decorators(statement), None, explicit_calls(statement.name.value)))
        elif (name := _attribute_name(statement)) is not None:
            if _removes_attribute(statement):
                attributes.pop(name, None)
                removed.add(name)
            else:
                attributes[name] = statement

    body = ([docstring] if docstring is not None else []) + list(attributes.values()) + others
    if not body:
        body = [cst.SimpleStatementLine([cst.Pass()])]
    return parent.with_changes(
        name=child.name,
        bases=new_bases,
        # `metaclass=...`, `total=False` and `[T]` as the child writes them, else as the parent does.
        keywords=child.keywords or parent.keywords,
        type_parameters=child.type_parameters or parent.type_parameters,
        decorators=_decorators(child, parent),
        body=as_block(parent.body, body),
        leading_lines=child.leading_lines,
    )


def _override(parent: cst.FunctionDef, child: cst.FunctionDef, note, explicit_calls) -> cst.FunctionDef:
    name = child.name.value
    if not any(super_call_name(s) == name for s in statements_of(child.body)):
        for call in find_all(child.body, lambda node: _is_super_call(node, name)):
            note(
                call,
                f"super().{name}(...) is not a statement of its own, so it cannot be replaced by the "
                f"parent's body; it now calls the next base's {name} instead",
            )
    params = expand_super_kwargs(child, parent)
    merged = child.with_changes(
        params=params,
        decorators=_decorators(child, parent),
        returns=child.returns or parent.returns,
        leading_lines=parent.leading_lines,
    )
    return unroll(merged, parent, explicit_calls(name))


_NO_INHERIT = "no_inherit_decorator"


def _decorators(
    child: cst.ClassDef | cst.FunctionDef, parent: cst.ClassDef | cst.FunctionDef
) -> list[cst.Decorator]:
    """The child's decorators if it writes any, else the parent's.

    ``@no_inherit_decorator`` is a marker meaning "none of the parent's": it is dropped from the output.
    """
    own = [d for d in child.decorators if dotted_name(d.decorator).split(".")[-1] != _NO_INHERIT]
    if len(own) != len(child.decorators):
        return own
    return list(child.decorators) or list(parent.decorators)


def _own_decorators(function: cst.FunctionDef) -> cst.FunctionDef:
    return function.with_changes(decorators=_decorators(function, function.with_changes(decorators=())))
