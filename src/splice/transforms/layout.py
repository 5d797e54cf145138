"""Layout ops: concat/split, stack/unstack, conv/linear, transpose, reshape."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch

from splice.tensors import TensorMeta
from splice.transforms.base import Op, cat, shapes_text, stack, tuple_or_none

# concat <-> split: fusing q/k/v or gate/up along the output dim (uneven sizes for GQA)


@dataclass(frozen=True)
class Concat(Op):
    """Join N tensors along ``dim``. ``sizes`` (each input's extent) is learned by :meth:`resolve`."""

    name: ClassVar[str] = "concat"
    dim: int = 0
    sizes: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "sizes", tuple_or_none(self.sizes))

    @property
    def resolved(self) -> bool:
        return self.sizes is not None

    def resolve(self, metas: Sequence[TensorMeta]) -> Concat:
        if not metas:
            raise self._fail("expected at least 1 input tensor(s), got 0")
        dim = self._dim(self.dim, len(metas[0].shape))
        sizes = tuple(m.shape[dim] for m in metas)
        if self.sizes is not None and sizes != self.sizes:
            raise self._fail(f"input sizes along dim {dim} are {list(sizes)}")
        return Concat(self.dim, sizes)

    def apply(self, tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        self._expect_count(tensors, len(self.sizes) if self.sizes else None)
        dim = self._dim(self.dim, tensors[0].dim())
        first = tensors[0]
        for t in tensors[1:]:
            if t.dtype != first.dtype:
                raise self._fail(f"inputs have different dtypes: {first.dtype} and {t.dtype}")
            if t.dim() != first.dim() or any(
                a != b for i, (a, b) in enumerate(zip(t.shape, first.shape)) if i != dim
            ):
                raise self._fail(
                    f"inputs must agree on every dim except {dim}; got shapes {shapes_text(tensors)}"
                )
        if self.sizes is not None and tuple(t.shape[dim] for t in tensors) != self.sizes:
            raise self._fail(f"input sizes along dim {dim} are {[t.shape[dim] for t in tensors]}")
        return [cat(tensors, dim)]

    def inverted(self) -> Split:
        if self.sizes is None:
            raise self._fail("cannot be inverted before its sizes are known; resolve it against input shapes")
        return Split(self.dim, self.sizes)

    def input_views(self, output: torch.Tensor) -> list[torch.Tensor]:
        """Views of ``output`` that each input lands in, so a loader can read straight into them."""
        return list(Split(self.dim, self.inverted().sizes).apply([output]))


@dataclass(frozen=True)
class Split(Op):
    """Cut one tensor along ``dim`` into pieces of ``sizes``. Returns views."""

    name: ClassVar[str] = "split"
    dim: int = 0
    sizes: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "sizes", tuple(self.sizes))
        if not self.sizes or any(s < 0 for s in self.sizes):
            raise self._fail("sizes must be a non-empty list of non-negative ints")

    def apply(self, tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        self._expect_count(tensors, 1)
        [x] = tensors
        dim = self._dim(self.dim, x.dim())
        if x.shape[dim] != sum(self.sizes):
            raise self._fail(
                f"input has size {x.shape[dim]} along dim {dim}, sizes add up to {sum(self.sizes)}"
            )
        return list(torch.split(x, list(self.sizes), dim))

    def inverted(self) -> Concat:
        return Concat(self.dim, self.sizes)


# --------------------------------------------------------------------------------------------------
# stack <-> unstack: MoE experts as one [E, ...] tensor


@dataclass(frozen=True)
class Stack(Op):
    """Stack N same-shaped tensors along a new ``dim``."""

    name: ClassVar[str] = "stack"
    dim: int = 0

    def apply(self, tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        self._expect_count(tensors, None)
        first = tensors[0]
        if any(t.shape != first.shape or t.dtype != first.dtype for t in tensors):
            raise self._fail(f"inputs must share shape and dtype; got {shapes_text(tensors)}")
        self._dim(self.dim, first.dim() + 1)
        return [stack(tensors, self.dim)]

    def inverted(self) -> Unstack:
        return Unstack(self.dim)

    def input_views(self, output: torch.Tensor) -> list[torch.Tensor]:
        return list(torch.unbind(output, self.dim))


MAX_UNSTACKED = 65536
"""Most tensors one unstack makes (experts of a MoE layer number in the hundreds)."""


@dataclass(frozen=True)
class Unstack(Op):
    """Split one tensor into its slices along ``dim`` (removing that dim). Returns views."""

    name: ClassVar[str] = "unstack"
    dim: int = 0

    def apply(self, tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        self._expect_count(tensors, 1)
        [x] = tensors
        dim = self._dim(self.dim, x.dim())
        if x.shape[dim] > MAX_UNSTACKED:  # an empty [10**8, 0] tensor costs a file nothing, and 10**8 outputs
            raise self._fail(f"would make {x.shape[dim]} tensors, more than the {MAX_UNSTACKED} allowed")
        return list(torch.unbind(x, dim))

    def inverted(self) -> Stack:
        return Stack(self.dim)


# --------------------------------------------------------------------------------------------------
# conv <-> linear: a patch embedding whose stride equals its kernel is a matmul over flattened patches


@dataclass(frozen=True)
class ConvToLinear(Op):
    """Conv weight ``[out, in, *kernel]`` -> Linear weight ``[out, in * prod(kernel)]``."""

    name: ClassVar[str] = "conv_to_linear"
    kernel: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "kernel", tuple_or_none(self.kernel))

    @property
    def resolved(self) -> bool:
        return self.kernel is not None

    def resolve(self, metas: Sequence[TensorMeta]) -> ConvToLinear:
        if len(metas) != 1 or len(metas[0].shape) < 3:
            raise self._fail(
                f"expected one conv weight of rank >= 3, got shapes {[list(m.shape) for m in metas]}"
            )
        return ConvToLinear(tuple(metas[0].shape[2:]))

    def apply(self, tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        self._expect_count(tensors, 1)
        [w] = tensors
        if w.dim() < 3:
            raise self._fail(f"expected a conv weight [out, in, *kernel], got shape {list(w.shape)}")
        if self.kernel is not None and tuple(w.shape[2:]) != self.kernel:
            raise self._fail(f"weight kernel is {list(w.shape[2:])}")
        return [w.reshape(w.shape[0], -1)]

    def inverted(self) -> LinearToConv:
        if self.kernel is None:
            raise self._fail("cannot be inverted before its kernel is known; resolve it against input shapes")
        return LinearToConv(self.kernel)

    def input_views(self, output: torch.Tensor) -> list[torch.Tensor]:
        return self.inverted().apply([output])


@dataclass(frozen=True)
class LinearToConv(Op):
    """Linear weight ``[out, in * prod(kernel)]`` -> conv weight ``[out, in, *kernel]``."""

    name: ClassVar[str] = "linear_to_conv"
    kernel: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "kernel", tuple(self.kernel))
        if not self.kernel or any(k <= 0 for k in self.kernel):
            raise self._fail("kernel must be a non-empty list of positive ints")

    def apply(self, tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        self._expect_count(tensors, 1)
        [w] = tensors
        patch = math.prod(self.kernel)
        if w.dim() != 2 or w.shape[1] % patch:
            raise self._fail(f"expected a linear weight [out, in * {patch}], got shape {list(w.shape)}")
        return [w.reshape(w.shape[0], w.shape[1] // patch, *self.kernel)]

    def inverted(self) -> ConvToLinear:
        return ConvToLinear(self.kernel)


# --------------------------------------------------------------------------------------------------
# transpose (its own inverse)


@dataclass(frozen=True)
class Transpose(Op):
    """Swap two dims (the result is contiguous)."""

    name: ClassVar[str] = "transpose"
    dim0: int = 0
    dim1: int = 1

    def apply(self, tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        self._expect_count(tensors, 1)
        [x] = tensors
        self._dim(self.dim0, x.dim()), self._dim(self.dim1, x.dim())
        return [x.transpose(self.dim0, self.dim1).contiguous()]

    def inverted(self) -> Transpose:
        return self


# --------------------------------------------------------------------------------------------------
# reshape: same elements in the same row-major order, other dims (e.g. [k*E, a, b] <-> [k, E, a, b])


@dataclass(frozen=True)
class Reshape(Op):
    """Give one tensor another shape with the same elements. ``source`` (its input shape) is learned by
    :meth:`resolve` and is what the inverse reshapes back to."""

    name: ClassVar[str] = "reshape"
    shape: tuple[int, ...] = ()
    source: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "shape", tuple(self.shape))
        object.__setattr__(self, "source", tuple_or_none(self.source))
        if any(n < 0 for n in self.shape) or any(n < 0 for n in self.source or ()):
            raise self._fail("shapes must be explicit non-negative sizes")

    @property
    def resolved(self) -> bool:
        return self.source is not None

    def resolve(self, metas: Sequence[TensorMeta]) -> Reshape:
        if len(metas) != 1:
            raise self._fail(f"expected 1 input tensor(s), got {len(metas)}")
        source = tuple(metas[0].shape)
        if self.source is not None and source != self.source:
            raise self._fail(f"input has shape {list(source)}")
        return Reshape(self.shape, source)

    def apply(self, tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        self._expect_count(tensors, 1)
        [x] = tensors
        if self.source is not None and tuple(x.shape) != self.source:
            raise self._fail(f"input has shape {list(x.shape)}")
        if x.numel() != math.prod(self.shape):
            raise self._fail(
                f"input of shape {list(x.shape)} has {x.numel()} elements, not {math.prod(self.shape)}"
            )
        return [x.reshape(self.shape)]

    def inverted(self) -> Reshape:
        if self.source is None:
            raise self._fail(
                "cannot be inverted before its input shape is known; resolve it against input shapes"
            )
        return Reshape(self.source, self.shape)
