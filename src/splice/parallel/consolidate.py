"""``splice consolidate SHARDS_DIR OUT_DIR``: the original checkpoint, rebuilt from per-rank shards.

Needs no process group, no model code and no transformers: ``splice-parallel.json`` (written by
`splice.parallel.save_shards`) holds the resolved checkpoint -> TP-global map, and its inverse is run
one step at a time: each TP-global tensor a step needs is assembled from the ranks' pieces (read
straight into place), the step's ops undo the layout (interleave, replicas, padding, fusion,
renames), and the results go to a `CheckpointWriter` laid out like the source checkpoint (same split,
metadata and index metadata), which replaces ``OUT_DIR`` atomically. Memory peaks at one step.

>>> consolidate("shards", "llama-again")                         # doctest: +SKIP
ConsolidateReport(out_dir=PosixPath('llama-again'), files=['model.safetensors'], ...)
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from splice.checkpoint import DTYPE_OF_TAG, TAG_OF_DTYPE, CheckpointReader, CheckpointWriter
from splice.checkpoint.paths import member
from splice.errors import CheckpointError, WeightMapError
from splice.parallel.layout import Read, local_reads, traceable
from splice.parallel.metadata import read_metadata
from splice.parallel.shards import METADATA_NAME, RANK_KEY, WORLD_KEY
from splice.tools import carry_side_files, progress_bar, refuse_overlap
from splice.transforms import TensorMeta, bitwise_equal
from splice.weightmap import Step, WeightMap
from splice.weightmap.growth import check_step

__all__ = ["ConsolidateReport", "consolidate", "run"]


@dataclass
class ConsolidateReport:
    out_dir: Path
    files: list[str]
    tensors: int
    bytes_read: int
    bytes_written: int
    seconds: float
    warnings: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class _Tensor:
    meta: TensorMeta
    dim: int | None
    bounds: list[tuple[int, int]] | None


def consolidate(
    shards_dir: str | os.PathLike, out_dir: str | os.PathLike, *, progress: bool = True
) -> ConsolidateReport:
    """Rebuild the original checkpoint from the shards in ``shards_dir`` into ``out_dir`` (replaced atomically)."""
    started = time.perf_counter()
    shards_dir, out = Path(shards_dir), Path(out_dir)
    document = read_metadata(shards_dir)
    refuse_overlap(shards_dir, out, src_name="SHARDS_DIR", dst_name="OUT_DIR")
    tensors = _tensors(document, shards_dir)
    readers = open_shards(shards_dir, document, tensors)
    warnings: list[str] = []
    try:
        steps, recorded = _plan(document, tensors, shards_dir)
        dtype_of = {k: tensors[step.targets[0]].meta.dtype for step in steps for k in step.sources}
        produced = {k: TensorMeta(recorded[k].shape, dtype_of[k]) for step in steps for k in step.sources}
        writer_args, more = _like_source(document.get("source") or {}, produced)
        warnings += more
        with CheckpointWriter(out, **writer_args) as writer:
            skip = {*document["files"], METADATA_NAME}
            carry_side_files(shards_dir, writer.staging_dir, warnings.append, skip.__contains__)
            total = sum(m.nbytes for m in produced.values())
            with progress_bar(progress, total, f"{shards_dir.name} -> {out.name}") as advance:
                for step in steps:
                    for key, tensor in _rebuild(step, recorded, tensors, readers).items():
                        writer.write(key, tensor)
                        advance(tensor.nbytes)
        return ConsolidateReport(
            out_dir=writer.out_dir,
            files=writer.filenames,
            tensors=len(produced),
            bytes_read=sum(r.bytes_read for r in readers),
            bytes_written=total,
            seconds=time.perf_counter() - started,
            warnings=warnings,
        )
    finally:
        for reader in readers:
            reader.close()


def _plan(
    document: dict[str, Any], tensors: dict[str, _Tensor], shards_dir: Path
) -> tuple[list[Step], dict[str, TensorMeta]]:
    """The checkpoint -> TP-global steps that made the shards, over the source's recorded keys and shapes."""
    where = shards_dir / METADATA_NAME
    try:
        recorded = {
            key: TensorMeta(tuple(shape), DTYPE_OF_TAG[tag])
            for key, (tag, shape) in (document.get("source") or {})["tensors"].items()
        }
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{where}: source.tensors is missing or malformed ({exc!r})") from None
    try:
        plan = WeightMap.from_dict(document["weight_map"]).compile(list(recorded))
    except WeightMapError as exc:
        raise CheckpointError(f"{where}: its weight_map does not fit the source checkpoint: {exc}") from None
    steps = []
    for step in plan.steps:
        held = [t in tensors for t in step.targets]
        if all(held):
            steps.append(replace(step, source_metas=tuple(recorded[k] for k in step.sources)))
        elif any(held):
            raise CheckpointError(f"{where}: the shards hold only some of {list(step.targets)}")
    made = {t for step in steps for t in step.targets}
    stray = [k for k in tensors if k not in made]
    if stray:
        raise CheckpointError(f"{where}: its weight_map produces no {stray[:3]}, which the shards hold")
    for step in steps:
        _check_source_shapes(step, recorded, tensors, str(where))
    return steps, recorded


def _check_source_shapes(
    step: Step, recorded: dict[str, TensorMeta], tensors: dict[str, _Tensor], where: str
) -> None:
    """The step's ops, run backwards on the shards' shapes, make the recorded source shapes, within the growth bound.

    The shapes of the TP-global tensors are checked against the shard files; the source's are only
    recorded, so they are allocated only once the map is seen to produce them from what the files hold.
    """
    globals_ = tuple(tensors[t].meta for t in step.targets)
    try:
        made = check_step(step.inverted(), globals_, where)
    except WeightMapError as exc:
        raise CheckpointError(str(exc)) from None
    for key, meta in zip(step.sources, made):
        if meta.shape != recorded[key].shape:
            raise CheckpointError(
                f"{where}: source.tensors records {key} as {list(recorded[key].shape)}, but its weight_map makes "
                f"{list(meta.shape)} out of the shards' {', '.join(map(str, globals_))}"
            )


def _rebuild(
    step: Step, recorded: dict[str, TensorMeta], tensors: dict[str, _Tensor], readers: list[CheckpointReader]
) -> dict[str, torch.Tensor]:
    """The step's checkpoint tensors, from the ranks' pieces of its TP-global tensors."""
    dims = {tensors[t].dim for t in step.targets}
    if dims == {None} and step.is_rename:
        return {s: readers[0].get(t) for s, t in zip(step.sources, step.targets)}
    if len(dims) == 1 and None not in dims:
        [dim] = dims
        if traceable(step, dim):
            return _gather_rows(step, dim, recorded, tensors, readers)
    # ops that are not pure row moves: the whole TP-global tensors, the step's ops run backwards
    inputs = [_assemble(readers, t, tensors[t]) for t in step.targets]
    return dict(zip(step.sources, step.inverted().run(inputs)))


def _gather_rows(
    step: Step,
    dim: int,
    recorded: dict[str, TensorMeta],
    tensors: dict[str, _Tensor],
    readers: list[CheckpointReader],
) -> dict[str, torch.Tensor]:
    """Read every row of the checkpoint tensors once, straight into place; check replicas agree and padding is zero.

    Which rank holds which rows comes from running the step's ops on row numbers (``local_reads``),
    as the loader does; the rows a step repeats (kv replicas) are compared with the first copy, and
    the rows it pads are checked to be zero, so nothing is merged or dropped that would be lost.
    """
    dtype = tensors[step.targets[0]].meta.dtype
    outs = {k: torch.empty(recorded[k].shape, dtype=dtype) for k in step.sources}
    filled = {k: torch.zeros(recorded[k].shape[dim], dtype=torch.bool) for k in step.sources}
    for target in step.targets:
        tensor = tensors[target]
        for rank, bounds in enumerate(tensor.bounds):
            if bounds[1] == bounds[0]:
                continue
            for read in local_reads(step, target, dim, bounds):
                if read.source is None:
                    piece = readers[rank].get_slice(target)[_index(dim, read.at, read.at + read.rows)]
                    if bool((piece != 0).any()):
                        raise CheckpointError(
                            f"{target}: rank {rank} holds non-zero values where its piece is padding "
                            f"(rows {read.at}:{read.at + read.rows} along dim {dim}); dropping them would lose them"
                        )
                    continue
                _place(readers[rank], target, read, dim, outs[read.source], filled[read.source], rank)
    for key, mask in filled.items():
        if not bool(mask.all()):
            missing = int((~mask).nonzero()[0])
            raise CheckpointError(f"{key}: row {missing} along dim {dim} is in no shard")
    return outs


def _place(
    reader: CheckpointReader,
    target: str,
    read: Read,
    dim: int,
    out: torch.Tensor,
    filled: torch.Tensor,
    rank: int,
) -> None:
    mask = filled[read.start : read.stop]
    runs = [(0, read.rows, bool(mask[0]))] if bool(mask.all()) or not bool(mask.any()) else _runs(mask)
    for a, b, seen in runs:
        index = _index(dim, read.at + a, read.at + b)
        place = out.narrow(dim, read.start + a, b - a)
        if not seen:
            reader.read_into(target, place, index)
        elif not bitwise_equal(reader.get_slice(target)[index], place):
            raise CheckpointError(
                f"{read.source}: rows {read.start + a}:{read.start + b} along dim {dim} are replicated, and rank "
                f"{rank}'s copy in {target} differs from an earlier rank's; merging the replicas would lose one"
            )
    filled[read.start : read.stop] = True


def _runs(mask: torch.Tensor) -> list[tuple[int, int, bool]]:
    runs, start = [], 0
    values = mask.tolist()
    for i in range(1, len(values) + 1):
        if i == len(values) or values[i] != values[start]:
            runs.append((start, i, values[start]))
            start = i
    return runs


def _index(dim: int, start: int, stop: int) -> tuple[slice, ...]:
    return (slice(None),) * dim + (slice(start, stop),)


# --------------------------------------------------------------------------------------------------
# reading and checking the shards


def _tensors(document: dict[str, Any], shards_dir: Path) -> dict[str, _Tensor]:
    out = {}
    for key, entry in document["tensors"].items():
        try:
            meta = TensorMeta(tuple(entry["shape"]), DTYPE_OF_TAG[entry["dtype"]])
            bounds = None if entry["dim"] is None else [tuple(b) for b in entry["bounds"]]
        except (KeyError, TypeError) as exc:
            raise CheckpointError(
                f"{shards_dir / METADATA_NAME}: tensor {key!r} is malformed ({exc!r})"
            ) from None
        out[key] = _Tensor(meta, entry["dim"], bounds)
    return out


def open_shards(
    shards_dir: Path, document: dict[str, Any], tensors: dict[str, _Tensor]
) -> list[CheckpointReader]:
    """One reader per rank, after checking that exactly the listed files are there and hold what they should."""
    world, files = document["world_size"], document["files"]
    if len(files) != world:
        raise CheckpointError(f"{shards_dir / METADATA_NAME}: lists {len(files)} files for {world} ranks")
    where = str(shards_dir / METADATA_NAME)
    paths = [
        member(shards_dir, name, where, f"the shard file of rank {rank}") for rank, name in enumerate(files)
    ]
    for rank, (name, path) in enumerate(zip(files, paths)):
        if not path.is_file():
            raise CheckpointError(f"{shards_dir}: shard {name} (rank {rank} of {world}) is missing")
    extra = sorted(p.name for p in shards_dir.glob("*.safetensors") if p.name not in files)
    if extra:
        raise CheckpointError(
            f"{shards_dir}: unexpected shard file {extra[0]}; {METADATA_NAME} lists {world} ranks: {', '.join(files)}"
        )
    readers: list[CheckpointReader] = []
    try:
        for rank, (name, path) in enumerate(zip(files, paths)):
            reader = CheckpointReader(path)
            readers.append(reader)
            meta = reader.metadata
            if meta.get(RANK_KEY) != str(rank) or meta.get(WORLD_KEY) != str(world):
                raise CheckpointError(
                    f"{shards_dir / name}: holds rank {meta.get(RANK_KEY)} of {meta.get(WORLD_KEY)}, "
                    f"expected rank {rank} of {world}"
                )
            expected = {}
            for key, t in tensors.items():
                if t.dim is None:
                    if rank == 0:
                        expected[key] = t.meta.shape
                else:
                    shape = list(t.meta.shape)
                    a, b = t.bounds[rank]
                    shape[t.dim] = b - a
                    expected[key] = tuple(shape)
            found = reader.metas()
            missing = [k for k in expected if k not in found]
            unexpected = [k for k in found if k not in expected]
            if missing or unexpected:
                what = f"lacks {missing[:3]}" if missing else f"holds unexpected {unexpected[:3]}"
                raise CheckpointError(f"{shards_dir / name}: {what}")
            for key, shape in expected.items():
                if found[key].shape != shape or found[key].dtype != tensors[key].meta.dtype:
                    raise CheckpointError(
                        f"{shards_dir / name}: {key} is {found[key]}, expected "
                        f"{TensorMeta(shape, tensors[key].meta.dtype)} for rank {rank}"
                    )
    except BaseException:
        for reader in readers:
            reader.close()
        raise
    return readers


def _assemble(readers: list[CheckpointReader], key: str, tensor: _Tensor) -> torch.Tensor:
    """The TP-global tensor, each rank's piece read straight into its place."""
    if tensor.dim is None:
        return readers[0].get(key)
    out = torch.empty(tensor.meta.shape, dtype=tensor.meta.dtype)
    for reader, (a, b) in zip(readers, tensor.bounds):
        if b > a:
            reader.read_into(key, out.narrow(tensor.dim, a, b - a))
    return out


# --------------------------------------------------------------------------------------------------
# writing like the source


def _like_source(source: dict[str, Any], produced: dict[str, TensorMeta]) -> tuple[dict[str, Any], list[str]]:
    """CheckpointWriter arguments that reproduce the source's split, metadata and index metadata."""
    warnings: list[str] = []
    files = [[k for k in f["keys"] if k in produced] for f in source.get("files", [])]
    files = [f for f in files if f]
    listed = {k for f in files for k in f}
    dropped = [k for f in source.get("files", []) for k in f["keys"] if k not in produced]
    if dropped:
        warnings.append(
            f"{len(dropped)} tensor(s) of the source checkpoint were not loaded by the model and are not in the "
            f"output: {', '.join(dropped[:5])}"
        )
    extra = [k for k in produced if k not in listed]
    if extra:
        files = (files or [[]])[:-1] + [(files or [[]])[-1] + extra]
    recorded = source.get("tensors") or {}
    changed = [
        k
        for k in produced
        if k in recorded and [TAG_OF_DTYPE[produced[k].dtype], list(produced[k].shape)] != recorded[k]
    ]
    if changed:
        warnings.append(
            f"{len(changed)} tensor(s) differ in dtype or shape from the source, e.g. {changed[0]}"
        )
    file_metadata = [f.get("metadata") for f in source.get("files", [])] or [{"format": "pt"}]
    if any(m != file_metadata[0] for m in file_metadata):
        warnings.append(
            "the source's files had different __metadata__; every output file gets the first one's"
        )
    index = source.get("index_metadata")
    args: dict[str, Any] = {
        "metadata": file_metadata[0] or None,
        "index_metadata": {k: v for k, v in (index or {}).items() if k != "total_size"},
    }
    metas = {k: produced[k] for f in files for k in f}
    return {**args, "metas": metas or dict(produced), "shards": files or None}, warnings


# --------------------------------------------------------------------------------------------------
# the command


def run(args: argparse.Namespace) -> int:
    """``splice consolidate SHARDS_DIR OUT_DIR [--quiet]``."""
    report = consolidate(args.shards_dir, args.out_dir, progress=not getattr(args, "quiet", False))
    for warning in report.warnings:
        print(f"splice consolidate: warning: {warning}", file=sys.stderr)
    print(
        f"{report.out_dir}: {report.tensors} tensors in {len(report.files)} file(s), "
        f"{report.bytes_written / 1e6:.1f} MB in {report.seconds:.2f} s"
    )
    return 0
