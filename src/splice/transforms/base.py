"""The op protocol: the `Op` base class, its registry, and the JSON / text forms (`TensorMeta` is in `splice.tensors`)."""

from __future__ import annotations

import ast
import dataclasses
import types
import typing
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from splice.errors import TransformError
from splice.tensors import TensorMeta

# the integer dtype of each float size, to compare floats bit for bit
INT_OF_SIZE = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def bitwise_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """True when two tensors have the same dtype, shape and bytes (so NaN == NaN and -0.0 != 0.0)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.dtype.is_floating_point or a.dtype.is_complex:
        size = a.dtype.itemsize
        if size not in INT_OF_SIZE:
            return bool(torch.equal(a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8)))
        return bool(torch.equal(a.view(INT_OF_SIZE[size]), b.view(INT_OF_SIZE[size])))
    return bool(torch.equal(a, b))


# --------------------------------------------------------------------------------------------------
# The base class and its registry


_REGISTRY: dict[str, type[Op]] = {}


@dataclass(frozen=True)
class Op:
    """A reversible tensor function: ``apply`` maps N tensors to M tensors, ``inverted`` is its inverse."""

    name: ClassVar[str] = ""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.name:
            _REGISTRY[cls.name] = cls

    def apply(self, tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        raise NotImplementedError

    def inverted(self) -> Op:
        raise NotImplementedError

    def inverse(self, tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        return self.inverted().apply(tensors)

    def resolve(self, metas: Sequence[TensorMeta]) -> Op:
        """This op with every size it can learn from its inputs filled in."""
        return self

    @property
    def resolved(self) -> bool:
        return True

    def infer(self, metas: Sequence[TensorMeta]) -> list[TensorMeta]:
        """Output shapes and dtypes for inputs of these shapes and dtypes, without touching data."""
        outputs = self.apply([m.empty("meta") for m in metas])
        return [TensorMeta.of(t) for t in outputs]

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"op": self.name}
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if value is None:
                continue
            out[field.name] = list(value) if isinstance(value, tuple) else value
        return out

    def __str__(self) -> str:
        parts = []
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if value is not None:
                parts.append(f"{field.name}={value!r}")
        return f"{self.name}({', '.join(parts)})"

    def _fail(self, message: str) -> TransformError:
        return TransformError(f"{self}: {message}")

    def _expect_count(self, tensors: Sequence[torch.Tensor], count: int | None, *, at_least: int = 1) -> None:
        n = len(tensors)
        if count is not None and n != count:
            raise self._fail(f"expected {count} input tensor(s), got {n}")
        if n < at_least:
            raise self._fail(f"expected at least {at_least} input tensor(s), got {n}")

    def _dim(self, dim: int, ndim: int) -> int:
        if not -ndim <= dim < ndim:
            raise self._fail(f"dim {dim} is out of range for a {ndim}-d tensor")
        return dim % ndim


def shapes_text(tensors: Sequence[torch.Tensor]) -> str:
    """``[2, 3], [4]``: the shapes of some tensors, for messages."""
    return ", ".join(str(list(t.shape)) for t in tensors)


def tuple_or_none(value: Any) -> tuple | None:
    """A field read from JSON or text as a tuple (lists are not hashable), None staying None."""
    return None if value is None else tuple(value)


def argsort(order: Sequence[int]) -> tuple[int, ...]:
    """The inverse of the permutation ``order``."""
    inverse = [0] * len(order)
    for position, index in enumerate(order):
        inverse[index] = position
    return tuple(inverse)


def check_permutation(op: Op, order: Sequence[int], what: str) -> None:
    """Refuse, naming ``op``, an ``order`` that is not a permutation of ``0..len(order) - 1``."""
    if sorted(order) != list(range(len(order))):
        raise op._fail(f"{what} {list(order)} is not a permutation of 0..{len(order) - 1}")


# --------------------------------------------------------------------------------------------------
# sequences of ops, JSON and text forms


def apply_ops(ops: Sequence[Op], tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    out = list(tensors)
    for op in ops:
        out = op.apply(out)
    return out


def infer_ops(ops: Sequence[Op], metas: Sequence[TensorMeta]) -> list[TensorMeta]:
    out = list(metas)
    for op in ops:
        out = op.infer(out)
    return out


def resolve_ops(ops: Sequence[Op], metas: Sequence[TensorMeta]) -> tuple[tuple[Op, ...], list[TensorMeta]]:
    """Resolve each op against the shapes flowing into it; returns the ops and the output metas."""
    resolved: list[Op] = []
    current = list(metas)
    for op in ops:
        op = op.resolve(current)
        current = op.infer(current)
        resolved.append(op)
    return tuple(resolved), current


def invert_ops(ops: Sequence[Op]) -> tuple[Op, ...]:
    return tuple(op.inverted() for op in reversed(ops))


def op_from_dict(data: dict[str, Any]) -> Op:
    """Build an op from its :meth:`Op.to_dict` form, with a clear error for unknown names or fields."""
    if not isinstance(data, dict) or "op" not in data:
        raise TransformError(f"an op must be a dict with an 'op' key, got {data!r}")
    fields = dict(data)
    name = fields.pop("op")
    cls = _REGISTRY.get(name)
    if cls is None:
        raise TransformError(f"unknown op {name!r}; known ops: {', '.join(sorted(_REGISTRY))}")
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(fields) - known)
    if unknown:
        raise TransformError(f"op {name!r} has no field(s) {unknown}; its fields are {sorted(known)}")
    hints = typing.get_type_hints(cls)
    values = {}
    for key, value in fields.items():
        ok, values[key] = conform(value, hints[key])
        if not ok:
            raise TransformError(f"op {name}: field {key} must be {describe_type(hints[key])}, got {value!r}")
    return cls(**values)


def conform(value: Any, hint: Any) -> tuple[bool, Any]:
    """``(True, value as the field holds it)`` when a JSON or literal value fits a dataclass field's annotation.

    One check driven by the annotations, so a new op (or a fusion family's options class) gets its
    fields checked without code of its own; annotations it does not know (``Any``, ``list[str]``) pass.
    ``bool`` is not accepted as an ``int`` (``concat(dim=True)`` is a mistake, not ``dim=1``).
    """
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        for option in args:
            ok, converted = (value is None, None) if option is type(None) else conform(value, option)
            if ok:
                return True, converted
        return False, value
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            return False, value
        items = [conform(item, args[0]) for item in value] if args[1:] == (Ellipsis,) else None
        if items is None:  # a fixed-length tuple
            if len(value) != len(args):
                return False, value
            items = [conform(item, option) for item, option in zip(value, args)]
        return all(ok for ok, _ in items), tuple(converted for _, converted in items)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool), value
    if hint in (str, bool):
        return isinstance(value, hint), value
    return True, value


_TYPE_NAMES = {str: "string"}


def describe_type(hint: Any) -> str:
    """``int`` -> ``an int``, ``tuple[str, ...] | None`` -> ``a list of strings``."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(describe_type(option) for option in args if option is not type(None))
    if origin is tuple:
        if args[1:] == (Ellipsis,):
            return f"a list of {_TYPE_NAMES.get(args[0], getattr(args[0], '__name__', args[0]))}s"
        return f"a list of {len(args)} values"
    name = _TYPE_NAMES.get(hint, getattr(hint, "__name__", str(hint)))
    return f"{'an' if name[0] in 'aeiou' else 'a'} {name}"


def parse_op(text: str) -> Op:
    """Parse the printed form of an op, e.g. ``"concat(dim=0, sizes=(64, 16, 16))"``."""
    try:
        call = ast.parse(text.strip(), mode="eval").body
    except SyntaxError as exc:
        raise TransformError(f"cannot parse op {text!r}: {exc.msg}") from None
    if isinstance(call, ast.Name):  # a bare name means an op with default fields
        call = ast.Call(func=call, args=[], keywords=[])
    if not isinstance(call, ast.Call) or not isinstance(call.func, ast.Name):
        raise TransformError(f"an op reads like name(arg=value, ...), got {text!r}")
    cls = _REGISTRY.get(call.func.id)
    if cls is None:
        raise TransformError(
            f"unknown op {call.func.id!r} in {text!r}; known ops: {', '.join(sorted(_REGISTRY))}"
        )
    try:
        names = [f.name for f in dataclasses.fields(cls)]
        if len(call.args) > len(names):
            raise TransformError(f"op {cls.name!r} takes at most {len(names)} positional arguments: {text!r}")
        data: dict[str, Any] = {"op": cls.name}
        data.update({names[i]: ast.literal_eval(arg) for i, arg in enumerate(call.args)})
        data.update({kw.arg: ast.literal_eval(kw.value) for kw in call.keywords if kw.arg})
    except ValueError as exc:
        raise TransformError(f"op arguments must be literals in {text!r}: {exc}") from None
    return op_from_dict(data)


def cat(tensors: Sequence[torch.Tensor], dim: int) -> torch.Tensor:
    """``torch.cat``, but shape arithmetic on meta tensors: the first meta ``torch.cat`` in a process
    imports torch._dynamo (~0.8 s), which planning from headers should not pay."""
    if tensors and all(t.is_meta for t in tensors):
        shape = list(tensors[0].shape)
        shape[dim] = sum(t.shape[dim] for t in tensors)
        return torch.empty(shape, dtype=tensors[0].dtype, device="meta")
    return torch.cat(list(tensors), dim)


def stack(tensors: Sequence[torch.Tensor], dim: int) -> torch.Tensor:
    """``torch.stack`` with the same meta shortcut as :func:`cat`."""
    if tensors and all(t.is_meta for t in tensors):
        shape = list(tensors[0].shape)
        shape.insert(dim % (len(shape) + 1), len(tensors))
        return torch.empty(shape, dtype=tensors[0].dtype, device="meta")
    return torch.stack(list(tensors), dim)
