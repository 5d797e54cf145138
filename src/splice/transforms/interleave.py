"""Interleave <-> deinterleave: pre-fused q/k/v layouts that repeat a small pattern per head or head group.

Checkpoints that ship q, k and v as one tensor lay the rows out in one of a few ways:

- contiguous ``[q; k; v]`` (MPT, Phi-3, GPT-2's Conv1D after a transpose): one group;
- per head ``[q0 k0 v0 | q1 k1 v1 | ...]`` (GPT-NeoX, BLOOM): ``groups`` = heads, ``sizes`` = head_dim each;
- per kv head ``[q0 q1 k0 v0 | q2 q3 k1 v1 | ...]`` (Falcon's new decoder architecture, GQA):
  ``groups`` = kv heads, ``sizes`` = (queries per kv head * head_dim, head_dim, head_dim).

``Deinterleave(dim, groups, sizes)`` reads such a tensor and returns one tensor per part, each in its
natural order (part ``i`` of group 0, then of group 1, ...); ``Interleave`` puts them back::

    >>> import torch
    >>> from splice.transforms import Deinterleave
    >>> fused = torch.arange(8)                       # 2 kv groups of [q q k v]: rows 0-3 and 4-7
    >>> [t.tolist() for t in Deinterleave(0, groups=2, sizes=(2, 1, 1)).apply([fused])]
    [[0, 1, 4, 5], [2, 6], [3, 7]]

With ``groups=1`` they are `Split` and `Concat`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch

from splice.tensors import TensorMeta
from splice.transforms.base import Op, cat, shapes_text, tuple_or_none


def _check(op: Op, groups: int, sizes: tuple[int, ...] | None) -> None:
    if not isinstance(groups, int) or groups < 1:
        raise op._fail("groups must be a positive int")
    if sizes is not None and (not sizes or any(s < 0 for s in sizes)):
        raise op._fail("sizes must be a non-empty list of non-negative ints")


@dataclass(frozen=True)
class Deinterleave(Op):
    """One tensor whose ``dim`` is ``groups`` repeats of parts of ``sizes`` -> one tensor per part."""

    name: ClassVar[str] = "deinterleave"
    dim: int = 0
    groups: int = 1
    sizes: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "sizes", tuple(self.sizes))
        _check(self, self.groups, self.sizes)

    def apply(self, tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        self._expect_count(tensors, 1)
        [x] = tensors
        dim = self._dim(self.dim, x.dim())
        expected = self.groups * sum(self.sizes)
        if x.shape[dim] != expected:
            raise self._fail(
                f"input has size {x.shape[dim]} along dim {dim}, not {self.groups} groups of {sum(self.sizes)}"
            )
        pieces = x.unflatten(dim, (self.groups, sum(self.sizes))).split(list(self.sizes), dim + 1)
        return [p.flatten(dim, dim + 1) for p in pieces]  # views when groups == 1, as Split's

    def inverted(self) -> Interleave:
        return Interleave(self.dim, self.groups, self.sizes)


@dataclass(frozen=True)
class Interleave(Op):
    """N tensors, each ``groups`` blocks along ``dim`` -> one tensor ``[a0 b0 c0 | a1 b1 c1 | ...]``.

    ``sizes`` (each input's block size) is learned by :meth:`resolve`.
    """

    name: ClassVar[str] = "interleave"
    dim: int = 0
    groups: int = 1
    sizes: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "sizes", tuple_or_none(self.sizes))
        _check(self, self.groups, self.sizes)

    @property
    def resolved(self) -> bool:
        return self.sizes is not None

    def resolve(self, metas: Sequence[TensorMeta]) -> Interleave:
        if not metas:
            raise self._fail("expected at least 1 input tensor(s), got 0")
        dim = self._dim(self.dim, len(metas[0].shape))
        extents = [m.shape[dim] for m in metas]
        if any(e % self.groups for e in extents):
            raise self._fail(f"input sizes {extents} along dim {dim} do not divide into {self.groups} groups")
        sizes = tuple(e // self.groups for e in extents)
        if self.sizes is not None and sizes != self.sizes:
            raise self._fail(
                f"input sizes along dim {dim} are {extents}, not {self.groups} x {list(self.sizes)}"
            )
        return Interleave(self.dim, self.groups, sizes)

    def apply(self, tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        self._expect_count(tensors, len(self.sizes) if self.sizes else None)
        first = tensors[0]
        dim = self._dim(self.dim, first.dim())
        for t in tensors:
            if t.dtype != first.dtype or t.dim() != first.dim():
                raise self._fail(f"inputs must share dtype and rank; got {shapes_text(tensors)}")
            if any(a != b for i, (a, b) in enumerate(zip(t.shape, first.shape)) if i != dim):
                raise self._fail(
                    f"inputs must agree on every dim except {dim}; got shapes {shapes_text(tensors)}"
                )
        sizes = self.sizes or self.resolve([TensorMeta.of(t) for t in tensors]).sizes
        if [t.shape[dim] for t in tensors] != [self.groups * s for s in sizes]:
            raise self._fail(
                f"input sizes along dim {dim} are {[t.shape[dim] for t in tensors]}, not {self.groups} x {list(sizes)}"
            )
        if self.groups == 1:
            return [cat(tensors, dim)]
        blocks = [t.unflatten(dim, (self.groups, s)) for t, s in zip(tensors, sizes)]
        return [cat(blocks, dim + 1).flatten(dim, dim + 1)]

    def inverted(self) -> Deinterleave:
        if self.sizes is None:
            raise self._fail("cannot be inverted before its sizes are known; resolve it against input shapes")
        return Deinterleave(self.dim, self.groups, self.sizes)


def row_order(groups: int, sizes: Sequence[int]) -> torch.Tensor:
    """For each row of the interleaved tensor, its row in the contiguous ``[a; b; c]`` (a permutation)."""
    starts = [sum(groups * s for s in sizes[:i]) for i in range(len(sizes))]
    parts = [torch.arange(start, start + groups * s) for start, s in zip(starts, sizes)]
    return Interleave(0, groups, tuple(sizes)).apply(parts)[0]
