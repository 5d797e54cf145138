"""What ``splice convert`` decides before reading a byte: the compiled map, the output's tensors and split,
and the record that lets ``--reverse`` restore the source exactly (or, reading that record, the reverse job)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from splice.checkpoint import DTYPE_OF_TAG, TAG_OF_DTYPE, CheckpointReader, plan_shards
from splice.checkpoint.writer import DEFAULT_MAX_SHARD_SIZE
from splice.errors import CheckpointError, WeightMapError
from splice.tensors import TensorMeta
from splice.weightmap import CompiledMap, WeightMap

__all__ = [
    "MAP_KEY",
    "SOURCE_LAYOUT_KEY",
    "SOURCE_METADATA_KEY",
    "Job",
    "forward_job",
    "replay_split",
    "reverse_job",
]

MAP_KEY = "splice.weightmap"
SOURCE_METADATA_KEY = "splice.source_metadata"
SOURCE_LAYOUT_KEY = "splice.source_layout"


@dataclass
class Job:
    """Everything decided before the first byte is read."""

    compiled: CompiledMap
    metas: dict[str, TensorMeta]  # the output's tensors, in the order the shard split needs
    max_shard_size: int | str
    metadata: dict[str, str] | None
    index_metadata: dict
    restored: bool
    warnings: list[str]


@dataclass
class Recorded:
    """The source of a conversion, as recorded in its output's metadata."""

    metadata: dict[str, str] | None
    index_metadata: dict | None  # None when the source was a single file
    files: list[list[str]]
    metas: dict[str, TensorMeta]


def forward_job(reader: CheckpointReader, weight_map: WeightMap) -> Job:
    """Convert with ``weight_map`` and record how to undo it."""
    metas = reader.metas()
    compiled = weight_map.compile(metas, metas)
    target_metas = compiled.target_metas
    source_metadata = reader.metadata or None
    index_metadata = {k: v for k, v in reader.index_metadata.items() if k != "total_size"}
    if isinstance(index_metadata.get("total_parameters"), int):
        added = sum(m.numel for m in target_metas.values()) - sum(m.numel for m in metas.values())
        index_metadata["total_parameters"] += added
    files: dict[Path, list[list]] = {path: [] for path in reader.files}
    for key, meta in metas.items():
        files[reader.file_of(key)].append([key, TAG_OF_DTYPE[meta.dtype], list(meta.shape)])
    layout = {
        "index_metadata": reader.index_metadata if reader.index_path else None,
        "files": list(files.values()),
    }
    carried = {k: v for k, v in (source_metadata or {}).items() if not k.startswith("splice.")}
    metadata = {
        **carried,
        MAP_KEY: weight_map.resolve(metas).to_json(indent=None),
        SOURCE_METADATA_KEY: json.dumps(source_metadata),
        SOURCE_LAYOUT_KEY: json.dumps(layout, separators=(",", ":")),
    }
    return Job(compiled, target_metas, DEFAULT_MAX_SHARD_SIZE, metadata, index_metadata, False, [])


def reverse_job(reader: CheckpointReader, weight_map: WeightMap | None) -> Job:
    """Undo a conversion: restore the recorded source exactly, or else convert with the inverted map."""
    where = str(reader.path)
    recorded = read_record(reader)
    if weight_map is None:
        text = reader.metadata.get(MAP_KEY)
        if text is None:
            raise WeightMapError(
                f"{where}: records no weight map ({MAP_KEY} is not in its metadata; it was not written by "
                "splice convert); give the map the conversion used with --map"
            )
        try:
            weight_map = WeightMap.from_json(text)
        except WeightMapError as exc:
            raise CheckpointError(f"{where}: the recorded {MAP_KEY} is unreadable: {exc}") from None
    elif recorded is not None:
        try:
            weight_map = weight_map.resolve(recorded.metas)
        except WeightMapError as exc:
            raise WeightMapError(
                f"the map does not fit the checkpoint {where} was converted from: {exc}"
            ) from None
    try:
        inverse = weight_map.invert()
    except WeightMapError as exc:
        raise WeightMapError(
            f"cannot invert the map: {exc}; {where} records no source shapes to learn them from (it was not "
            "written by splice convert), so write them into the map, e.g. concat(dim=0, sizes=(64, 16, 16))"
        ) from None
    if recorded is None:
        return forward_job(reader, inverse)

    metas = reader.metas()
    compiled = inverse.compile(metas, metas)
    produced = compiled.target_metas
    if produced != recorded.metas:
        raise WeightMapError(
            f"the map does not undo the conversion recorded in {where}: {_diff(produced, recorded.metas)}"
        )
    index_metadata = {k: v for k, v in (recorded.index_metadata or {}).items() if k != "total_size"}
    replay = replay_split(recorded.files, produced)
    if replay is None:
        warning = (
            f"the source's split into {len(recorded.files)} file(s) cannot be reproduced by a size limit; "
            f"sharding at {DEFAULT_MAX_SHARD_SIZE} instead (the tensors are the source's, bit for bit)"
        )
        return Job(
            compiled, produced, DEFAULT_MAX_SHARD_SIZE, recorded.metadata, index_metadata, True, [warning]
        )
    metas_in_order, limit = replay
    return Job(compiled, metas_in_order, limit, recorded.metadata, index_metadata, True, [])


def read_record(reader: CheckpointReader) -> Recorded | None:
    metadata = reader.metadata
    if SOURCE_LAYOUT_KEY not in metadata:
        return None
    try:
        source_metadata = json.loads(metadata.get(SOURCE_METADATA_KEY, "null"))
        layout = json.loads(metadata[SOURCE_LAYOUT_KEY])
        files = [[key for key, _tag, _shape in file] for file in layout["files"]]
        metas = {
            key: TensorMeta(tuple(shape), DTYPE_OF_TAG[tag])
            for file in layout["files"]
            for key, tag, shape in file
        }
        index_metadata = layout["index_metadata"]
        if not (source_metadata is None or isinstance(source_metadata, dict)):
            raise TypeError(f"{SOURCE_METADATA_KEY} is a {type(source_metadata).__name__}")
        if not (index_metadata is None or isinstance(index_metadata, dict)):
            raise TypeError(f"its index_metadata is a {type(index_metadata).__name__}")
    except (ValueError, KeyError, TypeError, RecursionError) as exc:
        raise CheckpointError(
            f"{reader.path}: {SOURCE_LAYOUT_KEY} / {SOURCE_METADATA_KEY} in its metadata are not what "
            f"splice convert writes ({type(exc).__name__}: {exc})"
        ) from None
    return Recorded(source_metadata, index_metadata, files, metas)


def _diff(produced: dict[str, TensorMeta], expected: dict[str, TensorMeta]) -> str:
    extra = [k for k in produced if k not in expected]
    missing = [k for k in expected if k not in produced]
    changed = [k for k in produced if k in expected and produced[k] != expected[k]]
    parts = []
    if missing:
        parts.append(f"it does not produce {shown_keys(missing)}")
    if extra:
        parts.append(f"it produces {shown_keys(extra)}, which the source did not have")
    if changed:
        k = changed[0]
        parts.append(
            f"{len(changed)} tensor(s) come out misshapen, e.g. {k!r} is {produced[k]}, was {expected[k]}"
        )
    return "; ".join(parts) + f" (reverse without --map uses the recorded {MAP_KEY})"


def replay_split(
    files: list[list[str]], metas: dict[str, TensorMeta]
) -> tuple[dict[str, TensorMeta], int] | None:
    """An order of ``metas`` and a size limit that make ``plan_shards`` split them into ``files``, if any do.

    The split is greedy (see ``plan_shards``): each shard's first tensor must overflow the one before,
    so the largest tensor of a shard goes first; a tensor over the limit gets its own shard ahead of
    the one being filled, so it is emitted right after the next shard's first tensor.
    """
    sizes = [sum(metas[k].nbytes for k in file) for file in files]
    # The largest shard that is not over the limit is the tightest limit that works; with every shard
    # over it, just under the smallest.
    candidates = sorted({*sizes, min(sizes, default=0) - 1} - {-1}, reverse=True)
    for limit in candidates:
        if any(size > limit and len(file) > 1 for size, file in zip(sizes, files)):
            break  # a larger candidate was needed for this shard; smaller ones cannot work either
        order: list[str] = []
        oversized: list[str] = []
        for size, file in zip(sizes, files):
            if size > limit:
                oversized += file
                continue
            first, *rest = sorted(file, key=lambda k: -metas[k].nbytes)
            order += [first, *oversized, *rest]
            oversized = []
        order += oversized
        ordered = {k: metas[k] for k in order}
        if [set(shard) for shard in plan_shards(ordered, limit)] == [set(file) for file in files]:
            return ordered, limit
    return None


def shown_keys(keys: list[str], limit: int = 5) -> str:
    return ", ".join(keys[:limit]) + (f", ... ({len(keys)} in all)" if len(keys) > limit else "")
