"""Tensor-parallel layouts of fused weights, as reversible WeightMap rules. Pure functions of sizes.

Column parallelism cuts a Linear's outputs (``Shard(0)`` of its weight): with ``tp`` ranks, rank ``r``
holds rows ``[r * n / tp, (r + 1) * n / tp)``. A plain cut of a fused ``[q | k | v]`` would give rank 0
all of q and none of k or v, so the *TP layout* of a fused weight lays the parts out rank-major::

    [q | k | v]  ->  [q_0 | k_0 | v_0 | q_1 | k_1 | v_1 | ...]

and the same plain cut then hands rank ``r`` exactly ``[q_r | k_r | v_r]``. Before that, each part is
made divisible by ``tp``:

- a part of heads (``unit`` = head_dim rows each) that ``tp`` divides is left alone;
- kv heads fewer than ranks are *replicated*: ``RepeatBlocks`` turns 2 kv heads at tp 4 into
  ``[k0 k0 k1 k1]``, so rank r holds kv head ``r // 2`` (``DedupBlocks`` undoes it, and refuses replicas
  that differ);
- a part of plain rows (an MLP's ``gate``/``up``) is *padded* with zero rows to the next multiple of
  ``tp`` (``Pad``; ``Unpad`` refuses to drop padding that is no longer zero). Its row-parallel partner
  (``down_proj``, cut along ``dim=1``) is padded with zero columns the same way, so the padding adds
  exactly nothing.

Every layout is a list of :class:`~splice.weightmap.Rule` from the original keys to the TP-global keys,
so it prints, serializes and inverts like any other map::

    >>> parts = column_parts([Part("q_proj", 64, 16), Part("k_proj", 32, 16, True), Part("v_proj", 32, 16, True)], tp=4)
    >>> for rule in fused_column_rules("attn.", parts, "qkv_proj", tp=4): print(rule)
    attn.k_proj.weight -> attn.k_proj.weight | repeat_blocks(dim=0, blocks=2, times=2)
    attn.v_proj.weight -> attn.v_proj.weight | repeat_blocks(dim=0, blocks=2, times=2)
    attn.{q,k,v}_proj.weight -> attn.qkv_proj.weight | concat(dim=0, sizes=(64, 64, 64)) | permute_blocks(dim=0, blocks=(3, 4, 16), perm=(1, 0, 2))

:func:`local_reads` answers the loader's question, *which bytes of the checkpoint make up my shard*,
by running a compiled step's ops on row numbers instead of weights.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from splice.errors import TransformError
from splice.transforms import Concat, Op, Pad, PermuteBlocks, Reorder, RepeatBlocks, Split
from splice.weightmap import Rule, Step, WeightMap

__all__ = [
    "Part",
    "PartLayout",
    "Read",
    "chunk_bounds",
    "column_parts",
    "fused_column_rules",
    "interleave",
    "layout_map",
    "local_reads",
    "padded",
    "part_rules",
    "row_rules",
]


# --------------------------------------------------------------------------------------------------
# which rows a rank holds


def chunk_bounds(size: int, tp: int) -> list[tuple[int, int]]:
    """``(start, stop)`` of each rank's piece of a dim of ``size`` cut ``tp`` ways, as DTensor's ``Shard`` cuts it.

    Pieces are ``ceil(size / tp)`` long; the last ones are shorter, or empty, when ``tp`` does not divide.

    >>> chunk_bounds(10, 4)
    [(0, 3), (3, 6), (6, 9), (9, 10)]
    """
    if tp < 1:
        raise ValueError(f"tp must be positive, got {tp}")
    step = -(-size // tp)
    return [(min(r * step, size), min((r + 1) * step, size)) for r in range(tp)]


def padded(size: int, tp: int) -> int:
    """The smallest multiple of ``tp`` that is at least ``size``."""
    return -(-size // tp) * tp


# --------------------------------------------------------------------------------------------------
# column-parallel parts


@dataclass(frozen=True)
class Part:
    """One column block of a (possibly fused) Linear: ``q_proj`` of ``qkv_proj``, or a whole unfused Linear."""

    name: str
    rows: int
    unit: int = 1
    """Rows per indivisible block: head_dim for attention heads, 1 for plain rows."""
    replicable: bool = False
    """Blocks may be replicated when they are fewer than the ranks (key and value heads may, queries may not)."""


@dataclass(frozen=True)
class PartLayout:
    """How one part becomes divisible by ``tp``: the ops (along dim 0), and what they add."""

    part: Part
    ops: tuple[Op, ...]
    global_rows: int
    tp: int
    replicas: int = 1
    """Copies of each block (1: none)."""
    padding: int = 0
    """Zero rows appended."""

    @property
    def local_rows(self) -> int:
        return self.global_rows // self.tp

    @property
    def blocks(self) -> int:
        return self.part.rows // self.part.unit


def column_parts(parts: Sequence[Part], tp: int, *, where: str = "") -> list[PartLayout]:
    """Make every part divisible by ``tp``: as is, with its blocks replicated, or padded with zero rows.

    >>> [(p.replicas, p.padding, p.local_rows) for p in column_parts([Part("gate", 90), Part("up", 90)], 4)]
    [(1, 2, 23), (1, 2, 23)]
    """
    at = f"{where}: " if where else ""
    layouts = []
    for part in parts:
        if part.unit < 1 or part.rows % part.unit:
            raise TransformError(
                f"{at}{part.name} has {part.rows} rows, not a whole number of {part.unit}-row blocks"
            )
        blocks = part.rows // part.unit
        if blocks % tp == 0:
            layouts.append(PartLayout(part, (), part.rows, tp))
        elif part.replicable and blocks and tp % blocks == 0:
            times = tp // blocks
            op = RepeatBlocks(0, blocks, times)
            layouts.append(PartLayout(part, (op,), part.rows * times, tp, replicas=times))
        elif part.unit == 1:
            size = padded(part.rows, tp)
            layouts.append(PartLayout(part, (Pad(0, size, part.rows),), size, tp, padding=size - part.rows))
        else:
            can = "divide" + (" or be a multiple of" if part.replicable else "")
            raise TransformError(
                f"{at}{part.name} has {blocks} head(s) of {part.unit} rows, which {tp} ranks cannot share: "
                f"the tensor-parallel size must {can} {blocks}"
            )
    return layouts


def interleave(sizes: Sequence[int], tp: int, dim: int = 0) -> Op:
    """The op that turns ``[a | b | c]`` into ``[a_0 b_0 c_0 | a_1 b_1 c_1 | ...]`` (each size divisible by ``tp``).

    Equal sizes give a ``PermuteBlocks`` (a transpose of a parts x ranks grid); uneven sizes a ``Reorder``.

    >>> print(interleave([4, 2], tp=2))
    reorder(dim=0, sizes=(2, 2, 1, 1), order=(0, 2, 1, 3))
    """
    if any(size % tp for size in sizes):
        raise TransformError(f"sizes {list(sizes)} do not all divide by tp={tp}")
    if len(set(sizes)) == 1:
        return PermuteBlocks(dim, (len(sizes), tp, sizes[0] // tp), (1, 0, 2))
    segments = tuple(size // tp for size in sizes for _ in range(tp))
    order = tuple(i * tp + r for r in range(tp) for i in range(len(sizes)))
    return Reorder(dim, segments, order)


def part_rules(prefix: str, layout: PartLayout, params: Sequence[str] = ("weight", "bias")) -> list[Rule]:
    """Rules that make one part divisible (nothing when it already is), for its weight and bias."""
    if not layout.ops:
        return []
    key = f"{prefix}{layout.part.name}"
    return [Rule((f"{key}.{p}",), (f"{key}.{p}",), layout.ops) for p in params]


def fused_column_rules(
    prefix: str,
    layouts: Sequence[PartLayout],
    fused_name: str,
    tp: int,
    params: Sequence[str] = ("weight",),
) -> list[Rule]:
    """Original part keys -> the fused TP-global key: each part made divisible, then concat and interleave."""
    rules = [rule for layout in layouts for rule in part_rules(prefix, layout, params)]
    sizes = tuple(layout.global_rows for layout in layouts)
    for p in params:
        sources = tuple(f"{prefix}{layout.part.name}.{p}" for layout in layouts)
        rules.append(Rule(sources, (f"{prefix}{fused_name}.{p}",), (Concat(0, sizes), interleave(sizes, tp))))
    return rules


def layout_map(rules: Sequence[Rule]) -> WeightMap:
    """A map of layout rules in two stages: parts made divisible (a key onto itself), then fused parts interleaved."""
    in_place = tuple(r for r in rules if r.sources == r.targets)
    return WeightMap((in_place, tuple(r for r in rules if r.sources != r.targets)))


def row_rules(key: str, in_features: int, tp: int) -> list[Rule]:
    """A row-parallel weight (cut along dim 1): zero columns up to a multiple of ``tp``, when needed."""
    if in_features % tp == 0:
        return []
    return [Rule((key,), (key,), (Pad(1, padded(in_features, tp), in_features),))]


# --------------------------------------------------------------------------------------------------
# what a rank reads


@dataclass(frozen=True)
class Read:
    """Rows ``[start, stop)`` of checkpoint tensor ``source`` (along the cut dim) land at ``at`` in the shard.

    ``source`` None means zeros (padding).
    """

    source: str | None
    start: int
    stop: int
    at: int

    @property
    def rows(self) -> int:
        return self.stop - self.start


_INDEX_OPS = (Concat, Split, Reorder, PermuteBlocks, RepeatBlocks, Pad)


def traceable(step: Step, dim: int) -> bool:
    """Whether every op of ``step`` only moves, repeats or pads whole slices along ``dim``."""
    if not step.source_metas:
        return False
    ndims = {len(m.shape) for m in step.source_metas}
    if len(ndims) != 1:
        return False
    [ndim] = ndims
    if not 0 <= dim < ndim:
        return False
    for instr in step.program:
        for op in instr.ops:
            if not isinstance(op, _INDEX_OPS) or op.dim % ndim != dim:
                return False
    return True


def local_reads(step: Step, target: str, dim: int, bounds: tuple[int, int]) -> list[Read] | None:
    """The reads that fill rows ``bounds`` (along ``dim``) of ``target``, or None when the ops are not traceable.

    The step's own ops run on row numbers (1-based, 0 for padding) laid along ``dim``, so the answer is
    exactly what running the step on the weights and cutting the result would give. Consecutive rows of
    one source merge into one read.
    """
    if not traceable(step, dim):
        return None
    ndim = len(step.source_metas[0].shape)
    ids, names, base = [], [], 0
    for key, meta in zip(step.sources, step.source_metas):
        shape = [1] * ndim
        shape[dim] = meta.shape[dim]
        ids.append((torch.arange(meta.shape[dim], dtype=torch.int64) + base + 1).reshape(shape))
        names.append((base, key))
        base += meta.shape[dim]
    out = dict(zip(step.targets, step.run(ids)))[target].reshape(-1)
    rows = out[bounds[0] : bounds[1]]
    if not rows.numel():
        return []
    starts = torch.tensor([b for b, _ in names], dtype=torch.int64)
    which = torch.searchsorted(starts, (rows - 1).clamp(min=0), right=True) - 1
    which = torch.where(rows == 0, -1, which)  # -1: padding
    # a read ends where the source changes or its rows stop being consecutive (padding runs stay together)
    step_up = rows[1:] - rows[:-1]
    breaks = (which[1:] != which[:-1]) | ((which[1:] >= 0) & (step_up != 1))
    firsts = [0, *(torch.nonzero(breaks).reshape(-1) + 1).tolist()]
    lasts = [*firsts[1:], rows.numel()]
    reads: list[Read] = []
    for a, b in zip(firsts, lasts):
        i = int(which[a])
        if i < 0:
            reads.append(Read(None, 0, b - a, a))
        else:
            start = int(rows[a]) - 1 - names[i][0]
            reads.append(Read(names[i][1], start, start + b - a, a))
    return reads
