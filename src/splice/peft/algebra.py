"""LoRA maths between a fused layer and its parts: pure functions on ranks and on tensors.

A LoRA adds ``scaling * B @ A`` to a weight ``W`` (out x in); ``A`` is r x in, ``B`` is out x r and
``scaling`` is ``alpha / r`` (``alpha / sqrt(r)`` with rsLoRA). When ``W`` is rows of a bigger
weight, or the bigger weight is made of several ``W``, two moves are exact:

- **rows** (`take_rows`): the rows of a fused LoRA that belong to one part are a LoRA of that part
  with the same ``A``, the same rank and the same scaling (``B[rows]``).
- **stack** (`stack`): LoRAs of the parts are one LoRA of the fused layer with ``A`` stacked and ``B``
  block-diagonal; the rank is the sum of the ranks, and alpha is chosen so that the scaling stays
  what it was (`stacked_spec`). Parts without a LoRA get zero rows. Nothing is averaged.

`take_rows` with ``cols`` is the inverse of `stack`: it takes one block back, and refuses when the
other blocks of those rows are not zero (the fused LoRA was trained past block-diagonal).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from splice.peft.errors import AdapterError
from splice.transforms import Deinterleave, Interleave


@dataclass(frozen=True)
class LoraSpec:
    """The shape of one LoRA: rank, alpha and whether it is rank-stabilized."""

    r: int
    alpha: float
    rslora: bool = False

    @property
    def scaling(self) -> float:
        # the exact expression PEFT evaluates (LoraLayer.update_layer), so equality here is equality there
        return self.alpha / math.sqrt(self.r) if self.rslora else self.alpha / self.r


@dataclass
class LoraWeights:
    """The tensors of one LoRA: ``A`` (r x in), ``B`` (out x r) and ``B``'s bias when lora_bias is on."""

    A: torch.Tensor
    B: torch.Tensor
    bias: torch.Tensor | None = None

    @property
    def r(self) -> int:
        return self.A.shape[0]


def stacked_spec(parts: Sequence[LoraSpec], *, where: str) -> LoraSpec:
    """The spec of one LoRA that holds ``parts`` as blocks, with the parts' common scaling kept exactly.

    The rank is the sum of the parts' ranks, padded with zero rows only when no alpha gives the same
    floating-point scaling at that rank (rsLoRA scales by 1/sqrt(r), which a sum of ranks rarely keeps).
    """
    if not parts:
        raise AdapterError(f"{where}: nothing to stack")
    rslora = {p.rslora for p in parts}
    scalings = {p.scaling for p in parts}
    if len(rslora) != 1 or len(scalings) != 1:
        described = ", ".join(f"r={p.r} alpha={p.alpha}: {p.scaling:g}" for p in parts)
        raise AdapterError(
            f"{where}: the LoRAs to combine have different scalings alpha/r ({described}); one LoRA has one "
            "scaling, so they cannot become one LoRA exactly. Give them the same alpha/r (rank_pattern and "
            "alpha_pattern together), or keep the layout unfused"
        )
    (scaling,), (use_rslora,) = scalings, rslora
    total = sum(p.r for p in parts)
    for r in range(total, 4 * total + 1):
        candidates = []
        if r == total and (not use_rslora or len(parts) == 1):
            candidates.append(sum(p.alpha for p in parts))
        candidates.append(scaling * (math.sqrt(r) if use_rslora else r))
        for alpha in candidates:
            alpha = int(alpha) if float(alpha).is_integer() else float(alpha)
            spec = LoraSpec(r, alpha, use_rslora)
            if spec.scaling == scaling:
                return spec
    raise AdapterError(f"{where}: no rank up to {4 * total} keeps the scaling {scaling!r} exactly")


def stack(
    parts: Sequence[LoraWeights | None], sizes: Sequence[int], spec: LoraSpec
) -> tuple[LoraWeights, list[tuple[int, int] | None]]:
    """One LoRA over the concatenated outputs: ``A`` stacked, ``B`` block-diagonal, zero-padded to ``spec.r``.

    Returns the weights and, per part, the columns (rank block) it occupies.
    """
    present = [p for p in parts if p is not None]
    reference = present[0].A
    in_features = reference.shape[1]
    A = reference.new_zeros(spec.r, in_features)
    B = present[0].B.new_zeros(sum(sizes), spec.r)
    with_bias = any(p.bias is not None for p in present)
    bias = present[0].B.new_zeros(sum(sizes)) if with_bias else None
    blocks: list[tuple[int, int] | None] = []
    row = col = 0
    for part, size in zip(parts, sizes):
        if part is None:
            blocks.append(None)
        else:
            A[col : col + part.r] = part.A
            B[row : row + size, col : col + part.r] = part.B
            if part.bias is not None:
                bias[row : row + size] = part.bias
            blocks.append((col, col + part.r))
            col += part.r
        row += size
    return LoraWeights(A, B, bias), blocks


def take_rows(
    weights: LoraWeights, rows: tuple[int, int], cols: tuple[int, int] | None = None, *, where: str
) -> LoraWeights:
    """The LoRA of the part that holds ``rows``: same ``A`` (or the block ``cols`` of it), ``B[rows]``."""
    start, stop = rows
    B = weights.B[start:stop]
    A = weights.A
    if cols is not None:
        lo, hi = cols
        outside = torch.cat([B[:, :lo], B[:, hi:]], dim=1)
        if outside.count_nonzero():
            raise AdapterError(
                f"{where}: rows {start}:{stop} of the fused LoRA also use rank columns outside {lo}:{hi} "
                "(it was trained past its block-diagonal form), so they are not the LoRA of one part; "
                "save the whole fused LoRA instead"
            )
        A, B = A[lo:hi], B[:, lo:hi]
    bias = None if weights.bias is None else weights.bias[start:stop]
    return LoraWeights(A.clone(), B.clone(), None if bias is None else bias.clone())


def interleave_rows(weights: LoraWeights, sizes: Sequence[int], groups: int) -> LoraWeights:
    """A LoRA of ``[q; k; v]`` (blocks of ``sizes`` rows) as the LoRA of a Linear with those blocks in
    ``groups`` interleaved groups (per head: ``[q0 k0 v0 | q1 k1 v1 | ...]``): B's rows and the bias move."""
    return _move_rows(weights, lambda t: Interleave(0, groups).apply(list(t.split(list(sizes))))[0])


def deinterleave_rows(weights: LoraWeights, sizes: Sequence[int], groups: int) -> LoraWeights:
    """The inverse of `interleave_rows`."""
    per_group = tuple(s // groups for s in sizes)
    return _move_rows(weights, lambda t: torch.cat(Deinterleave(0, groups, per_group).apply([t])))


def _move_rows(weights: LoraWeights, move) -> LoraWeights:
    bias = None if weights.bias is None else move(weights.bias)
    return LoraWeights(weights.A, move(weights.B), bias)


def join_rows(parts: Sequence[LoraWeights], *, where: str) -> LoraWeights | None:
    """The inverse of taking rows with a shared ``A``: one LoRA with ``B`` concatenated; None if the A's differ."""
    A = parts[0].A
    if any(p.A.shape != A.shape or not torch.equal(p.A, A) for p in parts[1:]):
        return None
    biases = [p.bias for p in parts]
    if any(b is None for b in biases) and any(b is not None for b in biases):
        return None
    bias = None if biases[0] is None else torch.cat(biases)
    return LoraWeights(A.clone(), torch.cat([p.B for p in parts]), bias)
