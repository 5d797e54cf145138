"""One tensor from byte ranges of several files, mapped from the page cache where the pages line up.

A TP rank's fused ``qkv_proj`` is its rows of q, then of k, then of v: three ranges of the file, none
next to the other. Reading them copies every byte into freshly allocated memory, and on a virtual
machine faulting in that fresh memory costs more than the copy. Instead, an anonymous region is
reserved for the whole tensor and every whole page of a range whose file offset has the same remainder
modulo the page size as its place in the region is replaced by a private mapping of the file
(``mmap(MAP_FIXED | MAP_PRIVATE)``): those pages come straight from the page cache, on first touch,
and a write copies just the page written. Only the partial pages at the ends of each range, and the
ranges that do not line up, are read. Safetensors files of matrices whose rows are a multiple of the
page size (4096 float32 columns, 2048 bfloat16 ones... and any multiple) line up throughout.

The tensor owns the region (``torch.frombuffer`` keeps the ``mmap`` object alive); freeing it unmaps
everything. Linux only; elsewhere ``stitch`` is not used (``CAN_STITCH``).
"""

from __future__ import annotations

import ctypes
import mmap
import sys
from collections.abc import Callable
from typing import NamedTuple

import torch

from splice.errors import CheckpointError
from splice.transforms import TensorMeta

from ._io import RandomAccessFile
from .format import TensorEntry

PAGE = mmap.PAGESIZE
MAX_PIECES = 64
"""More pieces than this (e.g. hundreds of experts) are read instead: each mapped piece is a few kernel
mappings, and a process may hold only ``vm.max_map_count`` of them."""

MAP_RUNS = 64
"""A selection of more contiguous runs than this is copied out of a transient mapping (Linux), not read.

Scattering a read over a buffer per run costs Python work per run: a column slice of a [1024, 2688]
float32 matrix took ~7 ms that way against ~2.5 ms for one ``copy_`` out of a mapping of the rows it spans
(the pages come from the page cache, and count towards the process's memory only until the copy ends).
"""

CAN_STITCH = sys.platform.startswith("linux") and hasattr(mmap, "MAP_ANONYMOUS")

_MAP_FIXED = 0x10  # Linux, every architecture
if CAN_STITCH:
    _libc = ctypes.CDLL(None, use_errno=True)
    _libc.mmap.restype = ctypes.c_void_p
    _libc.mmap.argtypes = [
        ctypes.c_void_p,
        ctypes.c_size_t,
        ctypes.c_int,
        ctypes.c_int,
        ctypes.c_int,
        ctypes.c_long,
    ]


class Piece(NamedTuple):
    """``length`` bytes at ``offset`` of ``file``, or ``length`` zero bytes when ``file`` is None."""

    file: RandomAccessFile | None
    offset: int
    length: int


class Stitched(NamedTuple):
    data: torch.Tensor
    """The pieces back to back: uint8 from ``stitch``, the rows in their dtype and shape from ``stitch_rows``."""
    mapped: int
    """Bytes of it that are file mappings (paged in on first touch)."""
    read: int
    """Bytes of it that were read."""


def stitch_rows(
    rows: list[tuple[RandomAccessFile | None, TensorEntry | None, int, int]], dtype: torch.dtype
) -> Stitched | None:
    """Rows ``start:stop`` of each ``(file, entry, start, stop)`` stacked (no file: zero rows); None when the
    tensors' dtype is not ``dtype``, they have no rows, or their trailing dims differ."""
    metas = [entry.meta for _, entry, _, _ in rows if entry is not None]
    if not metas or any(not m.shape or m.shape[1:] != metas[0].shape[1:] or m.dtype != dtype for m in metas):
        return None
    trailing = metas[0].shape[1:]
    row_bytes = TensorMeta(tuple(trailing), dtype).nbytes
    pieces = []
    for file, entry, start, stop in rows:
        if entry is not None and not 0 <= start <= stop <= entry.meta.shape[0]:
            raise CheckpointError(
                f"{file.path}: a tensor of {entry.meta.shape[0]} rows has no rows {start}:{stop}"
            )
        at = 0 if entry is None else entry.start + start * row_bytes
        pieces.append(Piece(file, at, (stop - start) * row_bytes))
    data, mapped, read = stitch(pieces)
    count = sum(stop - start for _, _, start, stop in rows)
    return Stitched(data.view(dtype).view(count, *trailing), mapped, read)


def stitch(pieces: list[Piece]) -> Stitched:
    """The bytes of ``pieces`` back to back, mapped where their pages line up and read where they do not."""
    total = sum(piece.length for piece in pieces)
    if not total:
        return Stitched(torch.empty(0, dtype=torch.uint8), 0, 0)
    # put the tensor at the remainder that lines up the most bytes of the file
    weight: dict[int, int] = {}
    position = 0
    for piece in pieces:
        if piece.file is not None:
            key = (piece.offset - position) % PAGE
            weight[key] = weight.get(key, 0) + piece.length
        position += piece.length
    shift = max(weight, key=weight.__getitem__) if weight else 0
    region = mmap.mmap(-1, max(PAGE, _round_up(shift + total)), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    memory = memoryview(region)
    base = ctypes.addressof(ctypes.c_char.from_buffer(region))
    mapped = read = 0
    try:
        position = shift
        for piece in pieces:
            start, end = position, position + piece.length
            position = end
            if piece.file is None:
                continue  # anonymous memory is zeros
            first = last = start  # the whole pages of [start, end) that are mapped: none unless they line up
            if (piece.offset - start) % PAGE == 0 and end - end % PAGE > _round_up(start):
                first, last = _round_up(start), end - end % PAGE
                if _map_fixed(base + first, last - first, piece.file, piece.offset + first - start):
                    mapped += last - first
                else:  # a file system that cannot map: read it all
                    first = last = start
            for a, b in ((start, first), (last, end)):
                if b > a:
                    read += piece.file.read_exactly([memory[a:b]], piece.offset + a - start)
    finally:
        memory.release()
    return Stitched(torch.frombuffer(region, dtype=torch.uint8, offset=shift, count=total), mapped, read)


def _map_fixed(address: int, length: int, file: RandomAccessFile, offset: int) -> bool:
    """Replace ``length`` bytes of memory at ``address`` with a private mapping of ``file`` from ``offset``."""
    prot = mmap.PROT_READ | mmap.PROT_WRITE
    return _libc.mmap(address, length, prot, mmap.MAP_PRIVATE | _MAP_FIXED, file.fileno(), offset) == address


def _round_up(n: int) -> int:
    return -(-n // PAGE) * PAGE


def copy_selection(
    file: RandomAccessFile, entry: TensorEntry, ranges: list[tuple[int, int]], offsets: list[int], run: int,
    out: torch.Tensor,
) -> int | None:  # fmt: skip
    """``out.copy_(tensor[ranges])`` out of a private mapping of the bytes the selection spans (its file
    ``runs`` at ``offsets``, of ``run`` bytes each); the bytes spanned, or None where it cannot be mapped."""
    meta = entry.meta
    if not CAN_STITCH or entry.start % meta.dtype.itemsize:
        return None
    strides = [1] * len(meta.shape)
    for dim in range(len(meta.shape) - 2, -1, -1):
        strides[dim] = strides[dim + 1] * meta.shape[dim + 1]
    shape = [stop - start for start, stop in ranges]
    end = entry.start + offsets[-1] + run
    if file.size() < end:  # touching a mapped page past the end would kill the process (SIGBUS)
        raise CheckpointError(
            f"{file.path}: unexpected end of file before byte {end} (was the file changed after it was opened?)"
        )

    def copy(window: torch.Tensor) -> None:
        with torch.no_grad():
            out.copy_(window.view(meta.dtype).as_strided(shape, strides))

    span = offsets[-1] + run - offsets[0]
    return span if through_mapping(file, entry.start + offsets[0], span, copy) else None


def through_mapping(
    file: RandomAccessFile, offset: int, length: int, use: Callable[[torch.Tensor], None]
) -> bool:
    """Call ``use`` on ``length`` bytes of ``file`` from ``offset``, as a uint8 tensor on a private mapping.

    For copying a strided selection (a column slice) out of the page cache with one ``copy_``: the file
    pages it touches count towards the process's memory only until the mapping is closed, on return.
    ``use`` must not keep the tensor. False, without calling ``use``, where the file cannot be mapped.
    """
    start = offset - offset % mmap.ALLOCATIONGRANULARITY
    try:
        window = mmap.mmap(
            file.fileno(), offset + length - start, flags=mmap.MAP_PRIVATE,
            prot=mmap.PROT_READ | mmap.PROT_WRITE, offset=start,
        )  # fmt: skip
    except (OSError, ValueError):
        return False
    try:
        use(torch.frombuffer(window, dtype=torch.uint8, offset=offset - start, count=length))
    finally:
        try:
            window.close()
        except BufferError:  # pragma: no cover - ``use`` kept a view: the mapping goes when the view does
            pass
    return True
