"""Which boxes of which checkpoint tensors make up a rank's shard, for steps that stack, reshape and transpose.

`splice.parallel.layout.local_reads` traces a step whose every op moves whole slices along the cut dim.
MoE experts need more: per-expert ``[I, H]`` checkpoint tensors become one ``[E, 2I, H]`` tensor through
``stack``, ``reshape`` and ``transpose`` (transformers' ``MergeModulelist`` + ``Concatenate``), and the
tensor-parallel cut is along dim 1 (each expert's gate and up rows) or dim 0 (whole experts, for
expert parallelism). Tracing such a step on element numbers would cost 8 bytes per weight.

:func:`block_reads` traces it on a *shrunk* copy instead: one source dim that every op carries along
unchanged (the hidden size ``H`` here) is cut to size 1, so each traced element stands for a whole line
of the real tensor. The ops are rewritten for the shrunk shapes (only ``reshape`` names that size, and
it may only keep it as its first or last dim), run on element numbers, and this rank's piece of the
target is read back as boxes: one :class:`Block` per checkpoint tensor when, as for experts, a tensor
lands in one box of the shard in row-major order. Anything else returns None, and the caller builds
the whole tensor and cuts it, as before.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from itertools import accumulate

import torch

from splice.transforms import (
    Concat,
    Op,
    Pad,
    PermuteBlocks,
    Reorder,
    RepeatBlocks,
    Reshape,
    Split,
    Stack,
    TensorMeta,
    Transpose,
    Unstack,
    apply_ops,
)
from splice.weightmap import Instr, Step

__all__ = ["Block", "block_reads", "fill_blocks"]

_ALONG_ONE_DIM = (Concat, Split, Pad, PermuteBlocks, Reorder, RepeatBlocks)
MAX_TRACED = 1 << 24
"""Most elements a shrunk trace may hold (128 MiB of int64); a bigger one is not worth planning this way."""


@dataclass(frozen=True)
class Block:
    """``source[source_index]`` lands, in row-major order, in ``local[at]`` (a box of the same size)."""

    source: str
    source_index: tuple[slice, ...]
    at: tuple[slice, ...]


def block_reads(step: Step, target: str, dim: int, bounds: tuple[int, int]) -> list[Block] | None:
    """The boxes that fill ``bounds`` along ``dim`` of ``target``; positions no box covers are padding (zeros).

    None when no source dim can be shrunk, or the sources do not land as boxes.
    """
    metas = step.source_metas
    if not metas or len({len(m.shape) for m in metas}) != 1 or target not in step.targets:
        return None
    ndim = len(metas[0].shape)
    for shrink in reversed(range(ndim)):
        traced = _shrunk(step, shrink)
        if traced is None:
            continue
        program, kept = traced
        if kept.get(target) is None or kept[target] == dim % len(step.target_metas[0].shape):
            continue
        return _boxes(step, program, shrink, target, kept[target], dim, bounds)
    return None


def fill_blocks(reader, blocks: list[Block], local: torch.Tensor) -> None:
    """Read every block straight into ``local`` (through a buffer when the two boxes differ in shape)."""
    for block in blocks:
        view = local[block.at]
        wanted = tuple(s.stop - s.start for s in block.source_index)
        if reader.meta(block.source).dtype == local.dtype and _squeezed(view.shape) == _squeezed(wanted):
            reader.read_into(block.source, view.view(wanted), block.source_index)  # only size-1 dims differ
        else:
            view.copy_(reader.get_slice(block.source)[block.source_index].reshape(view.shape))


def _squeezed(shape) -> tuple[int, ...]:
    return tuple(n for n in shape if n != 1)


# --------------------------------------------------------------------------------------------------
# the shrunk program


def _shrunk(step: Step, shrink: int) -> tuple[list[Instr], dict[str, int]] | None:
    """The step's program with source dim ``shrink`` cut to 1, and where that dim sits in each variable."""
    shapes = {
        k: [1 if d == shrink else n for d, n in enumerate(m.shape)]
        for k, m in zip(step.sources, step.source_metas)
    }
    sizes = {m.shape[shrink] for m in step.source_metas}
    if len(sizes) != 1:
        return None
    [size] = sizes
    kept = dict.fromkeys(step.sources, shrink)
    program: list[Instr] = []
    for instr in step.program:
        places = {kept.get(k) for k in instr.inputs}
        if len(places) != 1 or None in places:
            return None
        [place] = places
        shape = shapes[instr.inputs[0]]
        ops: list[Op] = []
        metas = [TensorMeta(tuple(shapes[k]), torch.int64) for k in instr.inputs]
        for op in instr.ops:
            rewritten = _rewrite(op, place, shape, size)
            if rewritten is None:
                return None
            op, place = rewritten
            metas = op.infer(metas)
            shape = list(metas[0].shape)
            ops.append(op)
        for k, m in zip(instr.outputs, metas):
            shapes[k] = list(m.shape)
            kept[k] = place
        program.append(Instr(instr.inputs, tuple(ops), instr.outputs))
    return program, kept


def _rewrite(op: Op, place: int, shape: list[int], size: int) -> tuple[Op, int] | None:
    """``op`` for inputs whose dim ``place`` (really ``size`` long) is 1 long, and where that dim goes."""
    ndim = len(shape)
    if isinstance(op, Stack):
        at = op.dim % (ndim + 1)
        return op, place + (place >= at)
    if isinstance(op, Unstack):
        at = op.dim % ndim
        return (op, place - (place > at)) if at != place else None
    if isinstance(op, _ALONG_ONE_DIM):
        return (op, place) if op.dim % ndim != place else None
    if isinstance(op, Transpose):
        a, b = op.dim0 % ndim, op.dim1 % ndim
        return op, {a: b, b: a}.get(place, place)
    if isinstance(op, Reshape):
        new = list(op.shape)
        if place == ndim - 1 and new and new[-1] == size:
            new[-1] = 1
            return Reshape(tuple(new), tuple(shape)), len(new) - 1
        if place == 0 and new and new[0] == size:
            new[0] = 1
            return Reshape(tuple(new), tuple(shape)), 0
    return None


# --------------------------------------------------------------------------------------------------
# from element numbers to boxes


def _boxes(
    step: Step, program: list[Instr], shrink: int, target: str, kept: int, dim: int, bounds: tuple[int, int]
) -> list[Block] | None:
    shapes = []
    for meta in step.source_metas:
        shape = list(meta.shape)
        shape[shrink] = 1
        shapes.append(shape)
    if sum(math.prod(s) for s in shapes) > MAX_TRACED:
        return None
    ids, base = [], 0
    for shape in shapes:
        n = math.prod(shape)
        ids.append((torch.arange(n, dtype=torch.int64) + base + 1).reshape(shape))
        base += n
    env = dict(zip(step.sources, ids))
    for instr in program:
        env.update(zip(instr.outputs, apply_ops(instr.ops, [env[k] for k in instr.inputs])))
    traced = env[target].narrow(dim, bounds[0], bounds[1] - bounds[0])
    positions = torch.nonzero(traced > 0)  # [N, ndim] target positions, in row-major order
    values = traced[traced > 0] - 1
    starts = torch.tensor([0, *accumulate(math.prod(s) for s in shapes)], dtype=torch.int64)
    which = torch.searchsorted(starts, values, right=True) - 1
    blocks: list[Block] = []
    for i in torch.unique(which).tolist():
        mine = which == i
        at = positions[mine]
        flat = values[mine] - starts[i]
        where = torch.stack(torch.unravel_index(flat, tuple(shapes[i])), dim=1)
        block = _box(step.sources[i], at, where, shrink, kept, step.source_metas[i].shape[shrink])
        if block is None:
            return None
        blocks.append(block)
    return blocks


def _box(
    source: str, at: torch.Tensor, where: torch.Tensor, shrink: int, kept: int, size: int
) -> Block | None:
    """One block when the target positions and the source positions are both full boxes, matched row-major."""
    lo_t, hi_t = at.min(0).values, at.max(0).values + 1
    lo_s, hi_s = where.min(0).values, where.max(0).values + 1
    count = at.shape[0]
    if int(torch.prod(hi_t - lo_t)) != count or int(torch.prod(hi_s - lo_s)) != count:
        return None
    # both are boxes; the i-th position of each in row-major order must pair up
    order = _row_major(where - lo_s, hi_s - lo_s)
    if not torch.equal(order, torch.arange(count)):
        return None  # positions arrive in the target's row-major order; the source's must match it
    # the shrunk dim then pairs up too when the same number of elements follows it in both boxes
    if int(torch.prod(hi_t[kept + 1 :] - lo_t[kept + 1 :])) != int(
        torch.prod(hi_s[shrink + 1 :] - lo_s[shrink + 1 :])
    ):
        return None
    target_index = [slice(int(a), int(b)) for a, b in zip(lo_t, hi_t)]
    source_index = [slice(int(a), int(b)) for a, b in zip(lo_s, hi_s)]
    target_index[kept] = slice(0, size)
    source_index[shrink] = slice(0, size)
    return Block(source, tuple(source_index), tuple(target_index))


def _row_major(positions: torch.Tensor, extents: torch.Tensor) -> torch.Tensor:
    strides = torch.ones_like(extents)
    for d in range(len(extents) - 2, -1, -1):
        strides[d] = strides[d + 1] * extents[d + 1]
    return (positions * strides).sum(1)
