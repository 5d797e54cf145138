"""``CheckpointWriter``: sharded safetensors written one tensor at a time, in any order, atomically.

Every file's header is known before any data exists (it depends only on names, shapes and dtypes), so
the writer lays out all shards up front and then ``pwrite``s each tensor at its offset as it arrives.
Memory stays at one tensor. The files are byte-for-byte what ``safetensors.torch.save_file`` writes for
the same tensors (see ``splice.checkpoint.format``), and the shard split and index are what
transformers' ``save_pretrained`` writes.
"""

from __future__ import annotations

import json
import os
import re
import threading
import weakref
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from splice.errors import CheckpointError
from splice.tensors import TensorMeta

from . import atomic
from ._io import RandomAccessFile, memory_of
from .format import FileLayout, check_little_endian, check_metadata, describe, encode_layout, tag_of
from .paths import close_matches
from .reader import DEFAULT_WEIGHTS_NAME

DEFAULT_MAX_SHARD_SIZE = "5GB"
_DEFAULT_METADATA = {"format": "pt"}

_SIZE_UNITS = {
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
    "TIB": 2**40,
}
_SIZE_PATTERN = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([A-Za-z]*)\s*")


def parse_size(size: int | str) -> int:
    """Bytes in a size such as ``5GB`` (10**9, as huggingface_hub counts), ``1.5MB``, ``512MiB`` or ``1000``.

    >>> parse_size("5GB"), parse_size("2KiB"), parse_size(7)
    (5000000000, 2048, 7)
    """
    if isinstance(size, bool) or not isinstance(size, (int, str)):
        raise CheckpointError(f"size must be an int or a string like '5GB', found {size!r}")
    if isinstance(size, int):
        value = size
    else:
        match = _SIZE_PATTERN.fullmatch(size)
        unit = match and (match.group(2).upper() or "B")
        if not match or unit not in _SIZE_UNITS:
            raise CheckpointError(
                f"size {size!r} is not a number followed by one of {', '.join(_SIZE_UNITS)} (e.g. '5GB')"
            )
        value = int(float(match.group(1)) * _SIZE_UNITS[unit])
    if value < 0:
        raise CheckpointError(f"size must not be negative, found {size!r}")
    return value


def plan_shards(
    metas: Mapping[str, TensorMeta], max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE
) -> list[list[str]]:
    """Split tensors into shards of at most ``max_shard_size`` bytes, exactly as huggingface_hub does.

    Greedy in the given order: a tensor that would overflow the current shard starts a new one, and a
    tensor larger than the limit gets a shard of its own, placed when it is met (ahead of the shard
    being filled). No tensors gives no shards.
    """
    limit = parse_size(max_shard_size)
    shards: list[list[str]] = []
    current: list[str] = []
    current_size = 0
    for key, meta in metas.items():
        size = meta.nbytes
        if size > limit:
            shards.append([key])
            continue
        if current_size + size > limit:
            shards.append(current)
            current, current_size = [], 0
        current.append(key)
        current_size += size
    if current:
        shards.append(current)
    return shards


def shard_filenames(weights_name: str, count: int) -> list[str]:
    """``model.safetensors`` for one shard, else ``model-00001-of-00003.safetensors``, ... (transformers' names)."""
    if count <= 1:
        return [weights_name]
    stem = weights_name.removesuffix(".safetensors")
    return [f"{stem}-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]


def index_json(weight_map: Mapping[str, str], metadata: Mapping[str, Any]) -> str:
    """The index file's text, formatted as transformers' ``save_pretrained`` formats it."""
    index = {"metadata": dict(metadata), "weight_map": dict(weight_map)}
    return json.dumps(index, indent=2, sort_keys=True) + "\n"


class CheckpointWriter:
    """Write a safetensors checkpoint whose tensors are declared up front and delivered one by one.

    ::

        metas = {name: TensorMeta.of(t) for name, t in state_dict.items()}
        with CheckpointWriter("out/llama", metas, max_shard_size="2GB") as writer:
            for name in metas:                      # any order, from any thread
                writer.write(name, produce(name))
            (writer.staging_dir / "config.json").write_text(config_json)

    On a clean exit from the ``with`` block (or ``commit()``) every declared tensor must have been
    written; the files are fsynced, ``model.safetensors.index.json`` is added when there are several
    shards, and the staging directory atomically replaces ``out_dir`` as a whole (see
    ``splice.checkpoint.atomic``): files already in ``out_dir`` that the staging directory does not hold
    are gone afterwards. On an exception (or ``abort()``) the staging directory is removed and
    ``out_dir`` is untouched.

    ``shards`` (lists of keys, one per file, in file order) fixes the split instead of ``max_shard_size``;
    splice uses it to write a checkpoint back with the exact split it was loaded from.
    ``metadata`` goes into every file's ``__metadata__`` (None for none). ``index_metadata`` adds
    entries beside ``total_size`` in the index, e.g. ``{"total_parameters": n}`` as transformers adds.
    """

    def __init__(
        self,
        out_dir: str | os.PathLike,
        metas: Mapping[str, TensorMeta],
        *,
        max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
        metadata: Mapping[str, str] | None = _DEFAULT_METADATA,
        weights_name: str = DEFAULT_WEIGHTS_NAME,
        index_metadata: Mapping[str, Any] | None = None,
        shards: Sequence[Sequence[str]] | None = None,
    ):
        check_little_endian()
        # Resolve symlinks so that a link to a checkpoint directory gets its target replaced, not itself.
        self.out_dir = Path(os.path.realpath(out_dir))
        where = str(self.out_dir)
        self._metas: dict[str, TensorMeta] = {}
        for key, meta in metas.items():
            if not isinstance(key, str) or not isinstance(meta, TensorMeta):
                raise CheckpointError(
                    f"{where}: metas must map tensor names to TensorMeta, found {key!r}: {meta!r}"
                )
            tag_of(meta.dtype, f"{where}: tensor {key!r}")
            shape = tuple(meta.shape)
            if not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
                raise CheckpointError(
                    f"{where}: tensor {key!r} has shape {shape}, expected non-negative integers"
                )
            self._metas[key] = TensorMeta(shape, meta.dtype)
        metadata = check_metadata(metadata, where)
        if not weights_name.endswith(".safetensors") or weights_name != os.path.basename(weights_name):
            raise CheckpointError(
                f"{where}: weights_name must be a file name ending in .safetensors, found {weights_name!r}"
            )

        plan = (
            _explicit_plan(shards, self._metas, where)
            if shards is not None
            else plan_shards(self._metas, max_shard_size)
        )
        plan = plan or [[]]
        names = shard_filenames(weights_name, len(plan))
        self._layouts: dict[str, FileLayout] = {}
        self._file_of: dict[str, str] = {}
        for name, keys in zip(names, plan):
            self._layouts[name] = encode_layout(((key, self._metas[key]) for key in keys), metadata)
            self._file_of.update(dict.fromkeys(keys, name))
        self._index_name = weights_name + ".index.json" if len(plan) > 1 else None
        self._index_metadata = {
            "total_size": sum(m.nbytes for m in self._metas.values()),
            **(index_metadata or {}),
        }

        self._written: set[str] = set()
        self._in_progress: set[str] = set()
        self._lock = threading.Lock()
        self._state = "open"
        self._files: dict[str, RandomAccessFile] = {}
        self._staging = atomic.make_staging_dir(self.out_dir)
        # Removes the staging directory if the writer is dropped without commit() or abort().
        self._finalizer = weakref.finalize(self, _discard, self._staging, self._files)
        try:
            for name, layout in self._layouts.items():
                file = self._files[name] = RandomAccessFile(self._staging / name, "xb")
                file.write_all(memoryview(layout.prefix), 0)
                os.ftruncate(file.fileno(), layout.size)
        except BaseException as e:
            self.abort()
            if isinstance(e, OSError) and not isinstance(e, CheckpointError):
                raise CheckpointError(
                    f"{where}: cannot create the checkpoint files in {self._staging}: {e}"
                ) from e
            raise

    @property
    def staging_dir(self) -> Path:
        """The directory that becomes ``out_dir`` on commit; other files (config.json, ...) may go here."""
        return self._staging

    @property
    def filenames(self) -> list[str]:
        """The safetensors files being written, in order."""
        return list(self._layouts)

    @property
    def weight_map(self) -> dict[str, str]:
        """Which file each tensor goes to."""
        return dict(self._file_of)

    @property
    def missing(self) -> list[str]:
        """Declared tensors not written yet, in declaration order."""
        return [key for key in self._metas if key not in self._written]

    def write(self, key: str, tensor: torch.Tensor) -> None:
        """Write one declared tensor at its place in its file. Any order; distinct keys may be written concurrently."""
        where = str(self.out_dir)
        with self._lock:
            self._check_open()
            meta = self._metas.get(key)
            if meta is None:
                raise CheckpointError(
                    f"{where}: tensor {key!r} was not declared when the writer was created "
                    f"({len(self._metas)} declared{close_matches(key, self._metas)})"
                )
            if key in self._written or key in self._in_progress:
                raise CheckpointError(f"{where}: tensor {key!r} is written twice")
            if not isinstance(tensor, torch.Tensor):
                raise CheckpointError(
                    f"{where}: tensor {key!r} must be a torch.Tensor, found {type(tensor).__name__}"
                )
            if tensor.device.type == "meta":
                raise CheckpointError(
                    f"{where}: tensor {key!r} is on the meta device and has no data to write"
                )
            found = TensorMeta(tuple(tensor.shape), tensor.dtype)
            if found != meta:
                raise CheckpointError(
                    f"{where}: tensor {key!r} was declared with {describe(meta)}, but the tensor written has {describe(found)}"
                )
            self._in_progress.add(key)
        try:
            name = self._file_of[key]
            data = tensor.detach().to("cpu").resolve_conj().resolve_neg().contiguous()
            self._files[name].write_all(memory_of(data), self._layouts[name].starts[key])
            del data
        except BaseException:
            with self._lock:
                self._in_progress.discard(key)
            raise
        with self._lock:
            self._in_progress.discard(key)
            self._written.add(key)

    def commit(self) -> Path:
        """Finish: check every tensor was written, make the files durable, and swap them in as ``out_dir``.

        If tensors are missing this raises and leaves the writer open, so they can still be written (or the
        writer aborted). Any later failure aborts the writer. Returns ``out_dir``.
        """
        with self._lock:
            self._check_open()
            if self._in_progress:
                raise CheckpointError(
                    f"{self.out_dir}: commit() while tensors are still being written: {sorted(self._in_progress)}"
                )
            missing = self.missing
            if missing:
                shown = ", ".join(map(repr, missing[:10])) + (", ..." if len(missing) > 10 else "")
                raise CheckpointError(
                    f"{self.out_dir}: {len(missing)} of {len(self._metas)} declared tensors were never written: {shown}"
                )
            self._state = "committing"
        try:
            for file in self._files.values():
                os.fsync(file.fileno())
                file.close()
            if self._index_name:
                index_path = self._staging / self._index_name
                with open(index_path, "x", encoding="utf-8") as f:
                    f.write(index_json(dict(sorted(self._file_of.items())), self._index_metadata))
                    f.flush()
                    os.fsync(f.fileno())
            atomic.fsync_dir(self._staging)
            atomic.replace_dir(self._staging, self.out_dir)
        except BaseException as e:
            self._state = "open"
            self.abort()
            if isinstance(e, OSError) and not isinstance(e, CheckpointError):
                raise CheckpointError(f"{self.out_dir}: commit failed, nothing was changed: {e}") from e
            raise
        self._state = "committed"
        self._finalizer.detach()
        return self.out_dir

    def abort(self) -> None:
        """Discard everything written; ``out_dir`` is left as it was. Does nothing after commit or a previous abort."""
        with self._lock:
            if self._state != "open":
                return
            self._state = "aborted"
        self._finalizer()

    def _check_open(self) -> None:
        if self._state != "open":
            raise CheckpointError(f"{self.out_dir}: the writer is {self._state}")

    def __enter__(self) -> CheckpointWriter:
        return self

    def __exit__(self, exc_type, exc, traceback) -> None:
        if self._state in ("committed", "aborted"):
            return
        if exc_type is not None:
            self.abort()
            return
        try:
            self.commit()
        except BaseException:
            self.abort()
            raise

    def __repr__(self) -> str:
        return (
            f"CheckpointWriter({str(self.out_dir)!r}, {len(self._written)}/{len(self._metas)} tensors written "
            f"to {len(self._layouts)} files, {self._state})"
        )


def _discard(staging: Path, files: dict[str, RandomAccessFile]) -> None:
    for file in files.values():
        file.close()
    atomic.remove_tree(staging)


def _explicit_plan(
    shards: Sequence[Sequence[str]], metas: Mapping[str, TensorMeta], where: str
) -> list[list[str]]:
    plan = [list(keys) for keys in shards]
    listed = [k for keys in plan for k in keys]
    duplicated = sorted({k for k in listed if listed.count(k) > 1})
    unknown = sorted(set(listed) - set(metas))
    missing = sorted(set(metas) - set(listed))
    if duplicated or unknown or missing or any(not keys for keys in plan):
        problems = [
            f"{name} {keys[:3]}"
            for name, keys in (
                ("listed twice:", duplicated),
                ("undeclared:", unknown),
                ("in no shard:", missing),
            )
            if keys
        ]
        raise CheckpointError(
            f"{where}: the explicit shard plan does not match the tensors ({'; '.join(problems) or 'an empty shard'})"
        )
    return plan
