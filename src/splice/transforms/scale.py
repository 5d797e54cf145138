"""Absorbing a norm's scale into the next Linear's input columns, with an exactness check both ways."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch

from splice.transforms.base import INT_OF_SIZE, Op, bitwise_equal

# absorb a norm's scale into the input columns of the next Linear


@dataclass(frozen=True)
class AbsorbScale(Op):
    """``[W, g] -> [W * g, g]`` with ``g`` broadcast along ``dim`` of ``W`` (the Linear's input columns).

    The scale is kept as the second output so the op can be undone; the op refuses when dividing back
    would not restore ``W`` bit for bit (for example a scale that is not a power of two).
    """

    name: ClassVar[str] = "absorb_scale"
    dim: int = 1

    def _operands(self, tensors: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, int]:
        self._expect_count(tensors, 2)
        w, g = tensors
        dim = self._dim(self.dim, w.dim())
        if not w.dtype.is_floating_point or g.dtype != w.dtype:
            raise self._fail(
                f"needs a floating weight and a scale of the same dtype, got {w.dtype} and {g.dtype}"
            )
        if g.dim() != 1 or g.shape[0] != w.shape[dim]:
            raise self._fail(
                f"scale of shape {list(g.shape)} does not fit dim {dim} of weight {list(w.shape)}"
            )
        shape = [1] * w.dim()
        shape[dim] = -1
        return w, g.reshape(shape), dim

    def apply(self, tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        w, g, _ = self._operands(tensors)
        scaled = w * g
        if not w.is_meta:
            _check_exact(self, scaled / g, w, "dividing the scale back out")
        return [scaled, tensors[1]]

    def inverted(self) -> UnabsorbScale:
        return UnabsorbScale(self.dim)


@dataclass(frozen=True)
class UnabsorbScale(Op):
    """``[W', g] -> [W' / g, g]``: the inverse of :class:`AbsorbScale`, with the same exactness check."""

    name: ClassVar[str] = "unabsorb_scale"
    dim: int = 1

    def apply(self, tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        w, g, _ = AbsorbScale(self.dim)._operands(tensors)
        unscaled = w / g
        if not w.is_meta:
            _check_exact(self, unscaled * g, w, "multiplying the scale back in")
        return [unscaled, tensors[1]]

    def inverted(self) -> AbsorbScale:
        return AbsorbScale(self.dim)


def _check_exact(op: Op, restored: torch.Tensor, original: torch.Tensor, what: str) -> None:
    if bitwise_equal(restored, original):
        return
    same = restored.view(INT_OF_SIZE[original.dtype.itemsize]) == original.view(
        INT_OF_SIZE[original.dtype.itemsize]
    )
    bad = int((~same).sum())
    worst = float((restored.float() - original.float()).abs().nan_to_num(float("inf")).max())
    raise op._fail(
        f"not exact: {what} changes {bad} of {original.numel()} elements (max abs error {worst:.3g}); "
        "the scale would be lost"
    )
