"""The contract between a fusion family and the rest of splice: the fused-layout record and the stand-ins.

A family that installs its own modules tells TP, LoRA and kernels what they are through these types,
so no package above fusion needs to know the family:

- :class:`FusedLayout` (returned by `ModuleFusionSpec.layout`, kept as `FusionRecord.layout`): which
  rows of which whole each part holds, and whether they are attention heads;
- :class:`StandIn`: a module put where an original module stood. A stand-in that only forwards a call
  to where the original now lives (a chain's pass-through) sets ``forwards_only``; one that now
  holds its former siblings (a fused chain) lists them in ``members()``;
- :class:`LinearStandIn`: a stand-in for an original Linear that owns no weight. It says which rows
  of which real weights it computes (``weight_rows``), so PEFT's LoRA can wrap it under the original
  name and merge into the right rows, and how it relates to its siblings (``memberships``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from splice.errors import FusionError


@dataclass(frozen=True)
class FusedLayout:
    """Where the parts of one fused (or split) instance sit in the rows of their whole; read by TP and LoRA.

    ``names[i]`` holds ``sizes[i]`` rows of the whole ``fused_name``; the whole is the parts back to
    back, or, with ``groups > 1``, interleaved in that many equal groups (per head). ``split``: the
    whole is the original module (a stand-in now) and the parts are new Linears; otherwise the parts
    are the originals (stand-ins now) and the whole is the new fused Linear.
    """

    fused_name: str
    names: tuple[str, ...]
    sizes: tuple[int, ...]
    groups: int = 1
    transposed: bool = False  # the whole's weight is [in, out] (a Conv1D)
    split: bool = False
    attention: bool = False  # the parts are an attention's q, k, v: tensor parallelism cuts them by heads
    head_dim: int | None = None  # known head size (then ``heads`` holds the heads per part)
    heads: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if len(self.names) != len(self.sizes):
            raise FusionError(
                f"FusedLayout of {self.fused_name}: names {self.names} and sizes {self.sizes} differ in length"
            )
        if (self.head_dim is None) != (self.heads is None):
            raise FusionError(f"FusedLayout of {self.fused_name}: head_dim and heads go together")


class StandIn(nn.Module):
    """Base class of every module a family installs where an original module stood."""

    forwards_only: ClassVar[bool] = False
    """True when the original module lives elsewhere now and this slot only hands the call on."""

    def members(self) -> tuple[str, ...]:
        """Children of this stand-in that stood beside it in the original model (a fused chain's members)."""
        return ()

    def describe(self) -> str:
        """What this stand-in is, for error messages."""
        return type(self).__name__


@dataclass(frozen=True)
class WeightRows:
    """Rows ``rows`` of a real ``weight`` (and ``bias``) produce rows ``out`` of a stand-in's output."""

    weight: torch.Tensor
    bias: torch.Tensor | None
    rows: slice
    out: slice | torch.Tensor  # a slice, or the output row indices when the parts are interleaved


@dataclass(frozen=True)
class Membership:
    """How one child relates to a group of fused or split Linears, by child names of one parent.

    ``slice``: an original Linear computed from rows of the new whole ``group``; ``fused``: that whole,
    holding ``members``; ``concat``: an original Linear computed from the new parts ``members``;
    ``part``: one of them, in the original whole ``group``. ``sizes`` are the rows of each block, and
    ``groups > 1`` means the whole's rows are the blocks interleaved in that many groups.
    """

    kind: str  # slice | fused | concat | part
    group: str | None = None
    members: tuple[str, ...] = ()
    sizes: tuple[int, ...] = ()
    index: int = -1
    groups: int = 1


class LinearStandIn(StandIn):
    """A stand-in for an original Linear that owns no weight; LoRA wraps it under the original name."""

    in_features: int
    out_features: int
    transposed: bool = False  # the original was a Conv1D ([in, out] weights)

    def weight_rows(self) -> list[WeightRows]:
        """The real weights this stand-in's output is made of, and which of their rows make which output rows."""
        raise NotImplementedError(f"{type(self).__name__} must implement weight_rows()")

    def read_rows(self, start: int, stop: int) -> None:
        """From now on, compute rows ``start:stop`` of the whole (this rank's rows, under tensor parallelism)."""
        raise NotImplementedError(
            f"{type(self).__name__} cannot be tensor-parallel: it implements no read_rows()"
        )

    @property
    def weight(self) -> torch.Tensor:
        """This stand-in's weight, read from the real ones (a view when it is one block of rows)."""
        return self._gather(lambda r: r.weight)

    @property
    def bias(self) -> torch.Tensor | None:
        if any(r.bias is None for r in self.weight_rows()):
            return None
        return self._gather(lambda r: r.bias)

    def _gather(self, tensor_of) -> torch.Tensor:  # noqa: ANN001
        parts = self.weight_rows()
        if len(parts) == 1:
            return tensor_of(parts[0])[parts[0].rows]
        first = tensor_of(parts[0])
        out = first.new_empty((self.out_features, *first.shape[1:]))
        for part in parts:
            out[part.out] = tensor_of(part)[part.rows]
        return out

    def memberships(self, parent: nn.Module, children: Mapping[str, nn.Module]) -> dict[str, Membership]:
        """The group this stand-in belongs to among ``children`` (the parent's, unwrapped), by child name.

        Empty when the group is not intact (a member was replaced by hand).
        """
        raise NotImplementedError(f"{type(self).__name__} must implement memberships()")


__all__ = ["FusedLayout", "LinearStandIn", "Membership", "StandIn", "WeightRows"]
