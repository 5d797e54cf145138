"""From a basic index to the byte runs it touches, in the file and in memory. Pure functions of shapes.

A selection of a C-ordered tensor is a set of equally long contiguous runs: every trailing dimension that
is selected whole merges into the run, the innermost partially selected dimension sets its length, and
the dimensions before it enumerate the runs. Selecting leading rows is therefore a single run.

``positional_reads`` then groups the runs into few positional reads: runs whose gaps are small are read
together, the gaps into a discard buffer, so a column slice of a matrix (one run per row) costs a few
system calls rather than one per row.
"""

from __future__ import annotations

import operator
from typing import Protocol

import torch

from splice.errors import CheckpointError
from splice.transforms import TensorMeta

from .format import TAG_OF_DTYPE, describe


class _Reader(Protocol):  # CheckpointReader, which imports this module
    def meta(self, key: str) -> TensorMeta: ...

    def _read(self, key: str, index: object) -> torch.Tensor: ...


Ranges = list[tuple[int, int]]
"""One ``(start, stop)`` per stored dimension; an integer index ``i`` is ``(i, i + 1)``."""


def select(index: object, shape: tuple[int, ...], where: str) -> tuple[Ranges, tuple[int, ...]]:
    """The per-dimension ranges of a basic index into ``shape``, and the shape of the result.

    Supports what ``tensor[index]`` supports among basic indices: integers (negative ones count from the
    end), slices with step 1 (bounds clipped like Python's), one ``...``, and fewer indices than
    dimensions. ``None`` as a whole index selects everything.
    """
    if index is None:
        return [(0, size) for size in shape], tuple(shape)
    items = index if isinstance(index, tuple) else (index,)
    ellipses = sum(item is Ellipsis for item in items)
    if ellipses > 1:
        raise CheckpointError(f"{where}: an index can have only one ellipsis (...), found {ellipses}")
    explicit = len(items) - ellipses
    if explicit > len(shape):
        raise CheckpointError(
            f"{where}: too many indices for a tensor of shape {tuple(shape)}: {explicit} given, {len(shape)} dimensions"
        )
    expanded: list[object] = []
    for item in items:
        if item is Ellipsis:
            expanded.extend([slice(None)] * (len(shape) - explicit))
        else:
            expanded.append(item)
    expanded.extend([slice(None)] * (len(shape) - len(expanded)))

    ranges: Ranges = []
    result_shape: list[int] = []
    for dim, (item, size) in enumerate(zip(expanded, shape)):
        if isinstance(item, slice):
            if item.step not in (None, 1):
                raise CheckpointError(
                    f"{where}: slice {_show(item)} on dimension {dim} has step {item.step}; only step 1 is read "
                    "from the file (read the range, then slice the tensor)"
                )
            start, stop, _ = item.indices(size)
            stop = max(start, stop)
            ranges.append((start, stop))
            result_shape.append(stop - start)
        else:
            position = _as_position(item, dim, where)
            if not -size <= position < size:
                raise CheckpointError(
                    f"{where}: index {position} is out of range for dimension {dim} of size {size}"
                )
            position %= size
            ranges.append((position, position + 1))
    return ranges, tuple(result_shape)


def _as_position(item: object, dim: int, where: str) -> int:
    if isinstance(item, bool) or (isinstance(item, torch.Tensor) and item.dtype == torch.bool):
        raise CheckpointError(
            f"{where}: boolean index {item!r} on dimension {dim} is not supported; use integers and slices"
        )
    if item is None:
        raise CheckpointError(
            f"{where}: None (a new axis) on dimension {dim} is not supported; unsqueeze the result"
        )
    if isinstance(item, torch.Tensor) and item.ndim != 0:
        raise CheckpointError(
            f"{where}: tensor index on dimension {dim} is advanced indexing, which is not supported; "
            "use integers and slices"
        )
    try:
        return operator.index(item)
    except TypeError:
        raise CheckpointError(
            f"{where}: cannot index dimension {dim} with {item!r} of type {type(item).__name__}; "
            "use integers, slices with step 1, and ..."
        ) from None


def _show(item: slice) -> str:
    parts = ["" if v is None else str(v) for v in (item.start, item.stop, item.step)]
    return ":".join(parts)


def file_runs(shape: tuple[int, ...], itemsize: int, ranges: Ranges) -> tuple[list[int], int]:
    """Byte offsets, from the tensor's first byte, of the contiguous runs a selection covers, and their length.

    Runs come in C order of the selection. An empty selection has no runs.
    """
    if any(stop == start for start, stop in ranges):
        return [], 0
    strides = [itemsize] * len(shape)
    for dim in range(len(shape) - 2, -1, -1):
        strides[dim] = strides[dim + 1] * shape[dim + 1]
    run = itemsize
    inner = len(shape) - 1
    while inner >= 0 and ranges[inner] == (0, shape[inner]):
        run *= shape[inner]
        inner -= 1
    if inner < 0:
        return [0], run
    start, stop = ranges[inner]
    run *= stop - start
    base = sum(ranges[dim][0] * strides[dim] for dim in range(inner + 1))
    offsets = torch.tensor([base], dtype=torch.int64)
    for dim in range(inner):
        start, stop = ranges[dim]
        if stop - start > 1:
            steps = torch.arange(stop - start, dtype=torch.int64) * strides[dim]
            offsets = (offsets[:, None] + steps).reshape(-1)
    return offsets.tolist(), run


def memory_runs(out: torch.Tensor, where: str) -> tuple[list[int], int]:
    """Byte offsets, from ``out``'s first element, of its maximal contiguous blocks in C order, and their length.

    A contiguous tensor is one block. A view such as ``dest[:, a:b]`` of a contiguous ``dest`` is one block
    per row. Layouts whose elements overlap, or that are not in C order (transposes), are refused.
    """
    if out.numel() == 0:
        return [], 0
    shape, strides, itemsize = tuple(out.shape), out.stride(), out.element_size()
    block = 1
    outer = len(shape) - 1
    while outer >= 0 and (shape[outer] == 1 or strides[outer] == block):
        block *= shape[outer]
        outer -= 1
    if outer < 0:
        return [0], block * itemsize
    extent = block  # elements spanned by one step of the dimension being checked
    for dim in range(outer, -1, -1):
        if shape[dim] == 1:
            continue
        if strides[dim] < extent:
            raise CheckpointError(
                f"{where}: out has shape {shape} and strides {strides}, a layout that is not C-ordered "
                "or overlaps itself; pass a contiguous tensor, or a view of one such as dest[:, a:b]"
            )
        extent = strides[dim] * (shape[dim] - 1) + extent
    offsets = torch.tensor([0], dtype=torch.int64)
    for dim in range(outer + 1):
        if shape[dim] > 1:
            steps = torch.arange(shape[dim], dtype=torch.int64) * (strides[dim] * itemsize)
            offsets = (offsets[:, None] + steps).reshape(-1)
    return offsets.tolist(), block * itemsize


Piece = tuple[int, int]
"""``(memory byte offset, length)`` of one piece of a read; offset ``DISCARD`` is a gap read and thrown away."""

DISCARD = -1


def positional_reads(
    file_offsets: list[int], run: int, memory_offsets: list[int], block: int, max_gap: int
) -> list[tuple[int, list[Piece]]]:
    """The reads that move file runs (``file_runs``) into memory blocks (``memory_runs``), as ``(file offset, pieces)``.

    Each read covers one contiguous stretch of the file and scatters it over its pieces in order. Runs
    follow each other in the same read when the gap between them is at most ``max_gap`` bytes; the gap
    becomes a ``DISCARD`` piece. Runs and blocks are in C order and their lengths divide one another (both
    are products of trailing dimensions of the same shape), so each run lands in one block or spans whole ones.
    """
    reads: list[tuple[int, list[Piece]]] = []
    if not file_offsets:
        return reads
    pieces: list[Piece] = []
    end = None
    per_run = run // block if block < run else 0
    for i, offset in enumerate(file_offsets):
        gap = None if end is None else offset - end
        if gap is not None and 0 <= gap <= max_gap:
            if gap:
                pieces.append((DISCARD, gap))
        else:
            pieces = []
            reads.append((offset, pieces))
        if per_run:
            pieces.extend((at, block) for at in memory_offsets[i * per_run : (i + 1) * per_run])
        else:
            position = i * run
            pieces.append((memory_offsets[position // block] + position % block, run))
        end = offset + run
    return reads


class TensorSlice:
    """A tensor in a checkpoint, read only when indexed: ``reader.get_slice(key)[0:128, :]``.

    Supports integers, slices with step 1 and ``...`` on any dimensions; each index reads just the bytes
    it selects. ``get_shape()`` and ``get_dtype()`` mirror ``safetensors.safe_open(...).get_slice``.
    """

    def __init__(self, reader: _Reader, key: str):
        self._reader = reader
        self.key = key
        self.meta: TensorMeta = reader.meta(key)

    @property
    def shape(self) -> tuple[int, ...]:
        return self.meta.shape

    @property
    def dtype(self) -> torch.dtype:
        return self.meta.dtype

    def get_shape(self) -> list[int]:
        return list(self.meta.shape)

    def get_dtype(self) -> str:
        return TAG_OF_DTYPE[self.meta.dtype]

    def __getitem__(self, index: object) -> torch.Tensor:
        return self._reader._read(self.key, index)

    def __len__(self) -> int:
        if not self.meta.shape:
            raise TypeError("len() of a 0-d tensor")
        return self.meta.shape[0]

    def __repr__(self) -> str:
        return f"TensorSlice({self.key!r}, {describe(self.meta)})"
