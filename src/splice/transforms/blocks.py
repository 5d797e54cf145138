"""Block ops for tensor-parallel layouts: permute/reorder blocks, repeat/dedup replicas, pad/unpad."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch

from splice.tensors import TensorMeta
from splice.transforms.base import Op, argsort, bitwise_equal, cat, check_permutation
from splice.transforms.layout import Split

# block permutations: head interleaving, rotary half-splitting, per-rank [q_r | k_r | v_r] layouts


@dataclass(frozen=True)
class PermuteBlocks(Op):
    """View ``dim`` as ``blocks`` (one entry may be -1), permute those axes by ``perm``, flatten back.

    ``PermuteBlocks(0, blocks=(2, 4, -1), perm=(1, 0, 2))`` turns ``[gate | up]`` into
    ``[gate_0 | up_0 | ... | gate_3 | up_3]``: the layout four tensor-parallel ranks want.
    """

    name: ClassVar[str] = "permute_blocks"
    dim: int = 0
    blocks: tuple[int, ...] = ()
    perm: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "blocks", tuple(self.blocks))
        object.__setattr__(self, "perm", tuple(self.perm))
        if len(self.blocks) != len(self.perm):
            raise self._fail("blocks and perm must have the same length")
        check_permutation(self, self.perm, "perm")
        if sum(b == -1 for b in self.blocks) > 1 or any(b == 0 or b < -1 for b in self.blocks):
            raise self._fail("blocks must be positive ints, with at most one -1")

    def _blocks_for(self, size: int) -> tuple[int, ...]:
        known = math.prod(b for b in self.blocks if b != -1)
        if size % known:
            raise self._fail(f"size {size} is not divisible into blocks {list(self.blocks)}")
        return tuple(size // known if b == -1 else b for b in self.blocks)

    def resolve(self, metas: Sequence[TensorMeta]) -> PermuteBlocks:
        if len(metas) != 1:
            raise self._fail(f"expected 1 input tensor(s), got {len(metas)}")
        dim = self._dim(self.dim, len(metas[0].shape))
        return PermuteBlocks(self.dim, self._blocks_for(metas[0].shape[dim]), self.perm)

    @property
    def resolved(self) -> bool:
        return -1 not in self.blocks

    def apply(self, tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        self._expect_count(tensors, 1)
        [x] = tensors
        dim = self._dim(self.dim, x.dim())
        blocks = self._blocks_for(x.shape[dim])
        if math.prod(blocks) != x.shape[dim]:
            raise self._fail(f"blocks {list(blocks)} do not multiply to size {x.shape[dim]} of dim {dim}")
        viewed = x.unflatten(dim, blocks)
        order = list(range(dim)) + [dim + p for p in self.perm] + list(range(dim + len(blocks), viewed.dim()))
        return [viewed.permute(order).flatten(dim, dim + len(blocks) - 1).contiguous()]

    def inverted(self) -> PermuteBlocks:
        if not self.resolved:
            raise self._fail("cannot be inverted while blocks holds -1; resolve it against input shapes")
        return PermuteBlocks(self.dim, tuple(self.blocks[p] for p in self.perm), argsort(self.perm))


@dataclass(frozen=True)
class Reorder(Op):
    """Cut ``dim`` into segments of ``sizes`` and lay them out again in ``order`` (uneven blocks)."""

    name: ClassVar[str] = "reorder"
    dim: int = 0
    sizes: tuple[int, ...] = ()
    order: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "sizes", tuple(self.sizes))
        object.__setattr__(self, "order", tuple(self.order))
        if len(self.sizes) != len(self.order):
            raise self._fail("sizes and order must have the same length")
        check_permutation(self, self.order, "order")

    def apply(self, tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        self._expect_count(tensors, 1)
        [x] = tensors
        dim = self._dim(self.dim, x.dim())
        segments = Split(dim, self.sizes).apply([x])
        return [cat([segments[i] for i in self.order], dim)]

    def inverted(self) -> Reorder:
        return Reorder(self.dim, tuple(self.sizes[i] for i in self.order), argsort(self.order))


# --------------------------------------------------------------------------------------------------
# repeat <-> dedup: kv heads replicated when there are more tensor-parallel ranks than kv heads


@dataclass(frozen=True)
class RepeatBlocks(Op):
    """View ``dim`` as ``blocks`` equal blocks and repeat each one ``times`` in place: ``[a b] -> [a a b b]``."""

    name: ClassVar[str] = "repeat_blocks"
    dim: int = 0
    blocks: int = 1
    times: int = 1

    def __post_init__(self) -> None:
        if self.blocks < 1 or self.times < 1:
            raise self._fail("blocks and times must be positive")

    def apply(self, tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        self._expect_count(tensors, 1)
        [x] = tensors
        dim = self._dim(self.dim, x.dim())
        if x.shape[dim] % self.blocks:
            raise self._fail(f"size {x.shape[dim]} of dim {dim} is not divisible into {self.blocks} blocks")
        viewed = x.unflatten(dim, (self.blocks, -1))
        return [viewed.repeat_interleave(self.times, dim=dim).flatten(dim, dim + 1)]

    def inverted(self) -> DedupBlocks:
        return DedupBlocks(self.dim, self.blocks, self.times)


@dataclass(frozen=True)
class DedupBlocks(Op):
    """Inverse of :class:`RepeatBlocks`; refuses when the replicas are not bitwise identical."""

    name: ClassVar[str] = "dedup_blocks"
    dim: int = 0
    blocks: int = 1
    times: int = 1

    def apply(self, tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        self._expect_count(tensors, 1)
        [x] = tensors
        dim = self._dim(self.dim, x.dim())
        if x.shape[dim] % (self.blocks * self.times):
            raise self._fail(
                f"size {x.shape[dim]} of dim {dim} is not {self.blocks} blocks x {self.times} copies"
            )
        viewed = x.unflatten(dim, (self.blocks, self.times, -1))
        first = viewed.narrow(dim + 1, 0, 1)
        if not x.is_meta:
            for copy in range(1, self.times):
                if not bitwise_equal(viewed.narrow(dim + 1, copy, 1), first):
                    block = _first_difference_block(viewed, first, dim, copy)
                    raise self._fail(
                        f"copy {copy} of block {block} differs from copy 0; merging the replicas would lose it"
                    )
        return [first.squeeze(dim + 1).flatten(dim, dim + 1).contiguous()]

    def inverted(self) -> RepeatBlocks:
        return RepeatBlocks(self.dim, self.blocks, self.times)


def _first_difference_block(viewed: torch.Tensor, first: torch.Tensor, dim: int, copy: int) -> int:
    for block in range(viewed.shape[dim]):
        a = viewed.narrow(dim + 1, copy, 1).narrow(dim, block, 1)
        if not bitwise_equal(a, first.narrow(dim, block, 1)):
            return block
    return -1


# --------------------------------------------------------------------------------------------------
# pad <-> unpad: sizes that do not divide by the number of ranks


@dataclass(frozen=True)
class Pad(Op):
    """Append zeros along ``dim`` up to ``size``. ``original`` (the unpadded size) is learned by resolve."""

    name: ClassVar[str] = "pad"
    dim: int = 0
    size: int = 0
    original: int | None = None

    def resolve(self, metas: Sequence[TensorMeta]) -> Pad:
        if len(metas) != 1:
            raise self._fail(f"expected 1 input tensor(s), got {len(metas)}")
        return Pad(self.dim, self.size, metas[0].shape[self._dim(self.dim, len(metas[0].shape))])

    @property
    def resolved(self) -> bool:
        return self.original is not None

    def apply(self, tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        self._expect_count(tensors, 1)
        [x] = tensors
        dim = self._dim(self.dim, x.dim())
        current = x.shape[dim]
        if self.original is not None and current != self.original:
            raise self._fail(f"input has size {current} along dim {dim}")
        if current > self.size:
            raise self._fail(f"input size {current} along dim {dim} is already larger than {self.size}")
        shape = list(x.shape)
        shape[dim] = self.size - current
        return [cat([x, x.new_zeros(shape)], dim)]

    def inverted(self) -> Unpad:
        if self.original is None:
            raise self._fail("cannot be inverted before the original size is known; resolve it first")
        return Unpad(self.dim, self.original, self.size)


@dataclass(frozen=True)
class Unpad(Op):
    """Drop the tail of ``dim`` past ``size``; refuses when the dropped part is not all zeros."""

    name: ClassVar[str] = "unpad"
    dim: int = 0
    size: int = 0
    padded: int | None = None

    def apply(self, tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        self._expect_count(tensors, 1)
        [x] = tensors
        dim = self._dim(self.dim, x.dim())
        current = x.shape[dim]
        if (self.padded is not None and current != self.padded) or current < self.size:
            raise self._fail(f"input has size {current} along dim {dim}")
        tail = x.narrow(dim, self.size, current - self.size)
        if not x.is_meta and tail.numel() and bool((tail != 0).any()):
            raise self._fail(
                f"the padding past index {self.size} of dim {dim} holds non-zero values; dropping it would lose them"
            )
        return [x.narrow(dim, 0, self.size)]

    def inverted(self) -> Pad:
        if self.padded is None:
            raise self._fail("cannot be inverted without the padded size")
        return Pad(self.dim, self.padded, self.size)


# --------------------------------------------------------------------------------------------------
# zero blocks: a bias that some of the fused Linears lack (Whisper's k_proj) is zero in the fused bias


@dataclass(frozen=True)
class InsertZeros(Op):
    """Insert all-zero tensors among the inputs: at positions ``at`` of the output list, ``sizes`` long along
    ``dim`` (other dims as the first input's)."""

    name: ClassVar[str] = "insert_zeros"
    dim: int = 0
    at: tuple[int, ...] = ()
    sizes: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "at", tuple(self.at))
        object.__setattr__(self, "sizes", tuple(self.sizes))
        if (
            len(self.at) != len(self.sizes)
            or list(self.at) != sorted(set(self.at))
            or any(n < 0 for n in (*self.at, *self.sizes))
        ):
            raise self._fail("at must be increasing positions, one size each")

    def apply(self, tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        self._expect_count(tensors, None)
        first = tensors[0]
        dim = self._dim(self.dim, first.dim())
        if self.at and self.at[-1] > len(tensors) + len(self.at) - 1:
            raise self._fail(
                f"position {self.at[-1]} is past the end of {len(tensors) + len(self.at)} outputs"
            )
        out, inputs = [], iter(tensors)
        for position in range(len(tensors) + len(self.at)):
            if position in self.at:
                shape = list(first.shape)
                shape[dim] = self.sizes[self.at.index(position)]
                out.append(first.new_zeros(shape))
            else:
                out.append(next(inputs))
        return out

    def inverted(self) -> DropZeros:
        return DropZeros(self.dim, self.at, self.sizes)


@dataclass(frozen=True)
class DropZeros(Op):
    """Inverse of :class:`InsertZeros`; refuses when a dropped tensor is not all zeros (it was trained)."""

    name: ClassVar[str] = "drop_zeros"
    dim: int = 0
    at: tuple[int, ...] = ()
    sizes: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "at", tuple(self.at))
        object.__setattr__(self, "sizes", tuple(self.sizes))
        InsertZeros(self.dim, self.at, self.sizes)  # the same checks

    def apply(self, tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        self._expect_count(tensors, None, at_least=len(self.at) + 1)
        for position, size in zip(self.at, self.sizes):
            if position >= len(tensors):
                raise self._fail(f"expected at least {position + 1} input tensor(s), got {len(tensors)}")
            block = tensors[position]
            if block.shape[self._dim(self.dim, block.dim())] != size:
                raise self._fail(
                    f"input {position} has shape {list(block.shape)}, not size {size} along dim {self.dim}"
                )
            if not block.is_meta and bool((block != 0).any()):
                nonzero = int((block != 0).sum())
                raise self._fail(
                    f"input {position} should be all zeros but {nonzero} of {block.numel()} values are not (was "
                    "it trained?); the original has no tensor there, so dropping it would lose them"
                )
        return [t for i, t in enumerate(tensors) if i not in self.at]

    def inverted(self) -> InsertZeros:
        return InsertZeros(self.dim, self.at, self.sizes)
