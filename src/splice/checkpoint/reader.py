"""``CheckpointReader``: lazy, validated reads of single-file and sharded safetensors checkpoints.

Headers are parsed (and checked) when the reader opens; tensor data is read only when asked for, with
positional reads straight into the destination tensor, so nothing is buffered on the way (the gaps of a
strided slice, read through rather than skipped with a call per run, land in one small discard buffer).
A strided selection of many runs (a TP rank's columns of a matrix: one run per row) is instead copied
with one ``copy_`` out of a transient private mapping of the bytes it spans, unmapped at once.
"""

from __future__ import annotations

import glob
import os
import threading
from collections.abc import Sequence
from pathlib import Path

import torch

from splice.errors import CheckpointError
from splice.tensors import TensorMeta

from ._io import RandomAccessFile, memory_of
from ._stitch import CAN_STITCH, MAP_RUNS, MAX_PIECES, copy_selection, stitch_rows
from .atomic import ASIDE_MARKER
from .format import (
    Header,
    TensorEntry,
    check_little_endian,
    describe,
    header_length,
    load_json_object,
    parse_header,
)
from .paths import close_matches, member, shown
from .slicing import DISCARD, Ranges, TensorSlice, file_runs, memory_runs, positional_reads, select

DEFAULT_WEIGHTS_NAME = "model.safetensors"

MAX_GAP = 64 << 10
"""Bytes of unselected data a read goes through (into a discard buffer) rather than start a new read.

A system call costs about what copying 64 KiB out of the page cache does, so reading a column slice of a
matrix row by row through the gaps costs a few calls per tensor, and at most one gap's worth of memory.
"""


class _Shard:
    """One open safetensors file and its header."""

    def __init__(self, path: Path):
        self.path = path
        try:
            self.file = RandomAccessFile(path, "rb")
        except FileNotFoundError:
            raise CheckpointError(f"{path}: no such file") from None
        except IsADirectoryError:
            raise CheckpointError(f"{path}: is a directory, expected a .safetensors file") from None
        except OSError as e:
            raise CheckpointError(f"{path}: cannot open: {e.strerror}") from None
        try:
            self.header = self._read_header()
        except BaseException:
            self.file.close()
            raise

    def _read_header(self) -> Header:
        size = self.file.size()
        prefix = bytearray(min(8, size))
        self.file.read_exactly([memoryview(prefix)], 0)
        n = header_length(bytes(prefix), size, str(self.path))
        raw = bytearray(n)
        self.file.read_exactly([memoryview(raw)], 8)
        return parse_header(bytes(raw), size, str(self.path))


class CheckpointReader:
    """Read tensors, or parts of them, from a safetensors checkpoint without loading the rest.

    ``path`` is a ``.safetensors`` file, a ``*.safetensors.index.json`` index, or a directory holding
    ``model.safetensors`` or ``model.safetensors.index.json`` (checked in that order, as transformers
    does; ``weights_name`` changes the ``model.safetensors`` part, e.g. ``adapter_model.safetensors``).

    Every header is validated on open: dtype tags, shapes against data offsets, contiguous
    non-overlapping data that ends exactly at the end of the file, and, for an index, that it and the
    shards agree key for key. Tensor data is read lazily with positional reads into the destination::

        with CheckpointReader("llama") as ckpt:
            ckpt.meta("lm_head.weight")                      # TensorMeta, no data read
            rows = ckpt.get_slice("lm_head.weight")[0:64]    # reads 64 rows, one system call
            ckpt.read_into("model.norm.weight", param.data)  # fills an existing tensor in place

    Keys keep file order for a single file (the order of the data) and index order for an index. The
    reader keeps one open descriptor per file until ``close()``; reads are thread-safe.
    """

    def __init__(self, path: str | os.PathLike, *, weights_name: str = DEFAULT_WEIGHTS_NAME):
        check_little_endian()
        self.path = Path(path)
        self._shards: dict[Path, _Shard] = {}
        self._entries: dict[str, tuple[_Shard, TensorEntry]] = {}
        self.index_path: Path | None = None
        self.index_metadata: dict = {}
        self._bytes_read = 0
        self._bytes_discarded = 0
        self._bytes_mapped = 0
        self._storages: dict[Path, torch.UntypedStorage] = {}
        self._lock = threading.Lock()
        self._closed = False
        try:
            self._open(weights_name)
        except BaseException:
            self.close()
            raise

    # ------------------------------------------------------------------------------------------ opening

    def _open(self, weights_name: str) -> None:
        path = self.path
        if path.is_dir():
            single, index = path / weights_name, path / (weights_name + ".index.json")
            if single.is_file():
                self._open_single(single)
            elif index.is_file():
                self._open_index(index)
            else:
                found = sorted(p.name for p in path.iterdir() if ".safetensors" in p.name)
                has = f"it holds {', '.join(found[:8])}" if found else "it holds no .safetensors files"
                raise CheckpointError(f"{path}: directory has neither {single.name} nor {index.name}; {has}")
        elif path.name.endswith(".json"):
            self._open_index(path)
        elif path.exists():
            self._open_single(path)
        else:
            aside = sorted(path.parent.glob(f".{glob.escape(path.name)}{ASIDE_MARKER}*")) if path.name else []
            hint = f"; an interrupted save left the previous checkpoint at {aside[-1]}" if aside else ""
            raise CheckpointError(f"{path}: no such file or directory{hint}")

    def _open_single(self, path: Path) -> None:
        shard = _Shard(path)
        self._shards[path] = shard
        self._entries = {name: (shard, entry) for name, entry in shard.header.entries.items()}

    def _open_index(self, index_path: Path) -> None:
        self.index_path = index_path
        try:
            raw = index_path.read_bytes()
        except FileNotFoundError:
            raise CheckpointError(f"{index_path}: no such file") from None
        except OSError as e:
            raise CheckpointError(f"{index_path}: cannot read: {e.strerror}") from None
        where = str(index_path)
        doc = load_json_object(raw, where, "the index")
        weight_map = doc.get("weight_map")
        if not isinstance(weight_map, dict):
            raise CheckpointError(
                f'{where}: expected a "weight_map" object mapping tensor names to shard files, '
                f"found {type(weight_map).__name__ if 'weight_map' in doc else 'no weight_map'}"
            )
        metadata = doc.get("metadata")
        if metadata is None:
            metadata = {}
        if not isinstance(metadata, dict):
            raise CheckpointError(f'{where}: "metadata" must be an object, found {type(metadata).__name__}')
        self.index_metadata = metadata

        keys_of: dict[str, list[str]] = {}
        shard_paths: dict[str, Path] = {}
        for key, filename in weight_map.items():
            if not isinstance(filename, str) or filename not in shard_paths:
                what = f"the shard file of tensor {shown(key)}"
                shard_paths[filename] = member(index_path.parent, filename, where, what)
            keys_of.setdefault(filename, []).append(key)
        for filename in sorted(keys_of):
            shard_path = shard_paths[filename]
            if not shard_path.is_file():
                keys = keys_of[filename]
                raise CheckpointError(
                    f"{where}: shard {filename} is missing ({shard_path} does not exist); "
                    f"{len(keys)} tensors map to it, e.g. {keys[0]!r}"
                )
            self._shards[shard_path] = _Shard(shard_path)

        for key, filename in weight_map.items():
            shard = self._shards[shard_paths[filename]]
            entry = shard.header.entries.get(key)
            if entry is None:
                raise CheckpointError(
                    f"{where}: maps tensor {key!r} to {filename}, but that file has no such tensor "
                    f"(it holds {len(shard.header.entries)} tensors{close_matches(key, shard.header.entries)})"
                )
            self._entries[key] = (shard, entry)
        for shard in self._shards.values():
            for key in shard.header.entries:
                owner = weight_map.get(key)
                if owner is None:
                    raise CheckpointError(
                        f"{shard.path}: holds tensor {key!r}, which the index {index_path.name} does not list"
                    )
                if shard_paths[owner] != shard.path:
                    raise CheckpointError(
                        f"{shard.path}: holds tensor {key!r}, which the index {index_path.name} maps to {owner}; "
                        "the key is duplicated across shards"
                    )

    # ------------------------------------------------------------------------------------- description

    def keys(self) -> list[str]:
        return list(self._entries)

    def __iter__(self):
        return iter(self._entries)

    def __contains__(self, key: object) -> bool:
        return key in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def meta(self, key: str) -> TensorMeta:
        """Shape and dtype of a tensor, from the header alone."""
        return self._entry(key)[1].meta

    def metas(self) -> dict[str, TensorMeta]:
        return {key: entry.meta for key, (_shard, entry) in self._entries.items()}

    def file_of(self, key: str) -> Path:
        return self._entry(key)[0].path

    @property
    def files(self) -> list[Path]:
        """The safetensors files of the checkpoint, sorted by name (one for an unsharded checkpoint)."""
        return sorted(self._shards, key=lambda p: p.name)

    @property
    def metadata(self) -> dict[str, str]:
        """The ``__metadata__`` of the first file (by name), or ``{}``. ``file_metadata`` gives every file's."""
        return self.file_metadata(self.files[0]) if self._shards else {}

    def file_metadata(self, file: str | os.PathLike) -> dict[str, str]:
        """The ``__metadata__`` of one file of the checkpoint, given by path or by name, or ``{}``."""
        for path, shard in self._shards.items():
            if Path(file) in (path, Path(path.name)):
                return dict(shard.header.metadata or {})
        raise CheckpointError(f"{self.path}: {file} is not one of its files: {[p.name for p in self.files]}")

    @property
    def bytes_read(self) -> int:
        """Tensor data bytes read so far (headers excluded); mapped tensors count in ``bytes_mapped``."""
        return self._bytes_read

    @property
    def bytes_discarded(self) -> int:
        """Bytes of the file gone through only to be thrown away: the gaps between the runs of a slice, read
        through (see MAX_GAP) or paged through by a mapped copy (see MAP_RUNS)."""
        return self._bytes_discarded

    @property
    def read_calls(self) -> int:
        """System calls made to read tensor data and headers so far (each a ``preadv``)."""
        return sum(shard.file.read_calls for shard in self._shards.values())

    @property
    def bytes_mapped(self) -> int:
        """Tensor data bytes handed out as file mappings by :meth:`map` (read lazily, on first touch)."""
        return self._bytes_mapped

    # ------------------------------------------------------------------------------------------ reading

    def get(self, key: str) -> torch.Tensor:
        """The whole tensor, in freshly allocated memory, holding exactly the stored bytes."""
        return self._read(key, None)

    def map(self, key: str) -> torch.Tensor:
        """The whole tensor with no copy: a view of a private, copy-on-write mapping of its file.

        Pages are read lazily when first touched (and count towards RSS then); writing to the tensor
        never changes the file. The mapping outlives ``close()``. This is how transformers keeps
        weights that need no change; splice uses it for tensors a load only renames.
        Falls back to :meth:`get` when the tensor's offset is not aligned to its element size.
        """
        shard, entry = self._entry(key)
        meta = entry.meta
        if entry.start % meta.dtype.itemsize or meta.numel == 0:
            return self.get(key)
        return self._mapped(shard, entry.start, meta)

    def map_adjacent(self, keys: Sequence[str]) -> torch.Tensor | None:
        """``torch.cat`` of the tensors ``keys`` along dim 0 with no copy, when the file already holds them
        back to back in this order (same file and dtype, matching trailing dims); else None.

        safetensors writes tensors sorted by name, so ``gate_proj`` is directly followed by ``up_proj``
        and the fused ``gate_up_proj`` is a mapping of the file as it stands (see :meth:`map`).
        """
        entries = [self._entry(k) for k in keys]
        shard, first = entries[0]
        meta = first.meta
        position = first.start
        for other_shard, entry in entries:
            m = entry.meta
            if (
                other_shard is not shard
                or entry.start != position
                or m.dtype != meta.dtype
                or len(m.shape) != len(meta.shape)
                or m.shape[1:] != meta.shape[1:]
                or not m.shape
                or m.numel == 0
            ):
                return None
            position += m.nbytes
        if first.start % meta.dtype.itemsize:
            return None
        rows = sum(entry.meta.shape[0] for _, entry in entries)
        return self._mapped(shard, first.start, TensorMeta((rows, *meta.shape[1:]), meta.dtype))

    def map_rows(
        self, rows: Sequence[tuple[str | None, int, int]], dtype: torch.dtype
    ) -> torch.Tensor | None:
        """``torch.cat([tensor[start:stop] for key, start, stop in rows])`` (a None key: that many zero rows),
        as private file mappings wherever the pages line up, read elsewhere; None when it cannot be (the
        tensors must have ``dtype`` and the same trailing dims). A TP rank takes its rows of q, k and v as
        one fused tensor this way, without copying them into fresh memory (see ``_stitch``).
        """
        if not CAN_STITCH or len(rows) > MAX_PIECES:
            return None
        entries = [(None, None) if key is None else self._entry(key) for key, _, _ in rows]
        located = [
            (shard and shard.file, entry, start, stop)
            for (shard, entry), (_, start, stop) in zip(entries, rows)
        ]
        stitched = stitch_rows(located, dtype)
        if stitched is None:
            return None
        with self._lock:
            self._bytes_mapped += stitched.mapped
            self._bytes_read += stitched.read
        return stitched.data

    def _mapped(self, shard: _Shard, start: int, meta: TensorMeta) -> torch.Tensor:
        with self._lock:
            storage = self._storages.get(shard.path)
            if storage is None:
                size = shard.file.size()
                storage = self._storages[shard.path] = torch.UntypedStorage.from_file(
                    str(shard.path), False, size
                )
            self._bytes_mapped += meta.nbytes
        tensor = torch.empty(0, dtype=meta.dtype)
        tensor.set_(storage, start // meta.dtype.itemsize, meta.shape)
        return tensor

    def get_slice(self, key: str) -> TensorSlice:
        """A lazy handle: ``get_slice(key)[a:b, ..., c]`` reads only the selected bytes."""
        self._entry(key)
        return TensorSlice(self, key)

    def read_into(self, key: str, out: torch.Tensor, index: object = None) -> torch.Tensor:
        """Fill ``out`` with ``tensor[index]`` (the whole tensor if ``index`` is None), reading straight into it.

        ``out`` must be a CPU tensor with the tensor's dtype and the selection's shape, either contiguous
        or a row-major view of contiguous memory such as ``fused[:, 64:128]``; when a contiguous stretch
        of the file lands in several places of ``out``, one ``preadv`` fills them all, and so does a strided
        selection such as a column slice whose gaps are at most MAX_GAP bytes. Returns ``out``.
        The write bypasses autograd, like ``copy_`` under ``torch.no_grad()``.
        """
        shard, entry = self._entry(key)
        where = f"{shard.path}: tensor {key!r}"
        ranges, shape = select(index, entry.meta.shape, where)
        if not isinstance(out, torch.Tensor):
            raise CheckpointError(f"{where}: out must be a torch.Tensor, found {type(out).__name__}")
        if out.device.type != "cpu" or out.layout != torch.strided:
            raise CheckpointError(
                f"{where}: out must be a dense CPU tensor, found a {out.layout} tensor on {out.device}; "
                "read into a CPU tensor and copy it"
            )
        found = TensorMeta(tuple(out.shape), out.dtype)
        expected = TensorMeta(shape, entry.meta.dtype)
        if found != expected:
            selection = "the tensor" if index is None else f"the selection {index!r}"
            raise CheckpointError(
                f"{where}: out must match {selection}: expected {describe(expected)}, found {describe(found)}"
            )
        self._fill(shard, entry, ranges, out, where)
        return out

    def _read(self, key: str, index: object) -> torch.Tensor:
        shard, entry = self._entry(key)
        where = f"{shard.path}: tensor {key!r}"
        ranges, shape = select(index, entry.meta.shape, where)
        out = torch.empty(shape, dtype=entry.meta.dtype)
        self._fill(shard, entry, ranges, out, where)
        return out

    def _fill(self, shard: _Shard, entry: TensorEntry, ranges: Ranges, out: torch.Tensor, where: str) -> None:
        meta = entry.meta
        offsets, run = file_runs(meta.shape, meta.dtype.itemsize, ranges)
        if not offsets:
            return
        wanted = len(offsets) * run
        # many runs (a column slice): one copy out of a mapping; else reads, through gaps up to MAX_GAP
        span = (
            copy_selection(shard.file, entry, ranges, offsets, run, out) if len(offsets) > MAP_RUNS else None
        )
        if span is None:
            block_offsets, block = memory_runs(out, where)
            reads = positional_reads(offsets, run, block_offsets, block, MAX_GAP)
            memory = memory_of(out)
            gap = max((n for _, pieces in reads for at, n in pieces if at == DISCARD), default=0)
            discard = memoryview(bytearray(gap))
            span = 0
            for offset, pieces in reads:
                buffers = [discard[:n] if at == DISCARD else memory[at : at + n] for at, n in pieces]
                span += shard.file.read_exactly(buffers, entry.start + offset)
        with self._lock:
            self._bytes_read += wanted
            self._bytes_discarded += span - wanted

    def _entry(self, key: str) -> tuple[_Shard, TensorEntry]:
        if self._closed:
            raise CheckpointError(f"{self.path}: reader is closed")
        try:
            return self._entries[key]
        except KeyError:
            raise CheckpointError(
                f"{self.path}: no tensor {key!r} among its {len(self._entries)} tensors"
                f"{close_matches(key, self._entries)}"
            ) from None
        except TypeError:
            raise CheckpointError(f"{self.path}: tensor names are strings, found {key!r}") from None

    # ------------------------------------------------------------------------------------------ closing

    def close(self) -> None:
        self._closed = True
        self._storages.clear()
        for shard in self._shards.values():
            shard.file.close()

    def __enter__(self) -> CheckpointReader:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def __repr__(self) -> str:
        layout = f"{len(self._shards)} files" if self.index_path else "1 file"
        return f"CheckpointReader({str(self.path)!r}, {len(self)} tensors in {layout})"
