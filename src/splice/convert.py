"""``splice convert``: rewrite a safetensors checkpoint into another layout, one rule group at a time.

::

    report = convert_checkpoint("llama", "llama-fused", WeightMap.load("fuse.json"))
    convert_checkpoint("llama-fused", "llama-again", None, reverse=True)   # byte-identical to "llama"

The map is compiled against the source's headers alone, so the output's files are laid out before any
tensor is read. Each plan step then reads its sources, runs its ops and writes its targets; memory
peaks at the largest step, not the checkpoint. A concat (or stack) reads its sources straight into
the fused tensor, and a split along the first dim reads each piece on its own, so those steps hold
one copy of their data.

Every forward conversion records, in each output file's ``__metadata__``, what it needs to be undone:
the map with every size resolved (``splice.weightmap``), the source's ``__metadata__``
(``splice.source_metadata``), and the source's files, tensors and index metadata
(``splice.source_layout``). ``reverse=True`` inverts the given map (learning sizes such as
``concat(dim=0)``'s from the recorded source) or, with no map, the recorded one, and writes the source
back with its metadata and shard split. The output replaces ``dst`` atomically; on any error ``dst`` is
left as it was.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from splice.checkpoint import DTYPE_OF_TAG, TAG_OF_DTYPE, CheckpointReader, CheckpointWriter, plan_shards
from splice.checkpoint.atomic import refuse_foreign_dir
from splice.checkpoint.paths import copy_side_files
from splice.checkpoint.reader import DEFAULT_WEIGHTS_NAME
from splice.checkpoint.writer import DEFAULT_MAX_SHARD_SIZE
from splice.errors import CheckpointError, WeightMapError
from splice.weightmap.growth import check_compiled
from splice.transforms import Split, TensorMeta, Unstack
from splice.weightmap import CompiledMap, Step, WeightMap

__all__ = ["ConvertReport", "convert_checkpoint", "run"]

MAP_KEY = "splice.weightmap"
SOURCE_METADATA_KEY = "splice.source_metadata"
SOURCE_LAYOUT_KEY = "splice.source_layout"

# Files beside the weights that are not copied into the output (they are the weights, in some format).
_WEIGHT_SUFFIXES = (".safetensors", ".index.json", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf")

_DIRECT_READS = True
"""Read into one reused buffer, concat/stack sources into their place in the result, split pieces by slice.
Off, each step reads whole sources into new tensors and runs its ops; the benchmark compares the two."""

_Write = Callable[[str, torch.Tensor], None]


@dataclass
class ConvertReport:
    """What a conversion did."""

    out_dir: Path
    files: list[str]
    """The safetensors files written, in order."""
    steps: int
    bytes_read: int
    bytes_written: int
    unclaimed: list[str]
    """Source keys no rule claimed; they were copied unchanged."""
    unused_rules: list[str]
    """Rules that matched no key."""
    restored: bool
    """``reverse`` found a recorded source and wrote back its metadata (and its shard split, unless warned)."""
    warnings: list[str]
    """Things the caller should hear about that did not stop the conversion."""
    seconds: float


@dataclass
class _Job:
    """Everything decided before the first byte is read."""

    plan: CompiledMap
    metas: dict[str, TensorMeta]  # the output's tensors, in the order the shard split needs
    max_shard_size: int | str
    metadata: dict[str, str] | None
    index_metadata: dict
    restored: bool
    warnings: list[str]


@dataclass
class _Recorded:
    """The source of a conversion, as recorded in its output's metadata."""

    metadata: dict[str, str] | None
    index_metadata: dict | None  # None when the source was a single file
    files: list[list[str]]
    metas: dict[str, TensorMeta]


def convert_checkpoint(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    weight_map: WeightMap | str | os.PathLike | None,
    *,
    reverse: bool = False,
    max_shard_size: int | str | None = None,
    progress: bool = True,
    strict: bool = False,
) -> ConvertReport:
    """Convert the checkpoint ``src`` (file, index or directory) into the directory ``dst``.

    ``weight_map`` is a :class:`WeightMap` or the path of its JSON; with ``reverse=True`` it may be None
    to undo the conversion recorded in ``src``. ``max_shard_size`` defaults to transformers' ``5GB``, or
    on reverse to the recorded source's split. ``strict`` makes unclaimed keys and unused rules errors.
    Other files beside the weights (``config.json``, tokenizer files) are copied unchanged.
    """
    started = time.perf_counter()
    if isinstance(weight_map, (str, os.PathLike)):
        weight_map = WeightMap.load(weight_map)
    if weight_map is None and not reverse:
        raise WeightMapError(
            "a weight map is needed (only a reverse conversion can use the one recorded in SRC)"
        )
    _refuse_overlap(Path(src), Path(dst))
    with CheckpointReader(src) as reader:
        _refuse_overlap_files(reader, Path(dst))
        job = _reverse_job(reader, weight_map) if reverse else _forward_job(reader, weight_map)
        check_compiled(job.plan, str(src))  # the ops may come from a file: bounded before anything is allocated
        if max_shard_size is not None:
            job.max_shard_size = max_shard_size
            job.warnings = []  # the caller chose the split
        plan = job.plan
        unused = [str(r) for r in plan.unused_rules]
        problems = [f"{len(unused)} rule(s) matched no key: {'; '.join(unused)}"] if unused else []
        if strict:
            if plan.unclaimed:
                problems.append(f"{len(plan.unclaimed)} key(s) no rule claims: {_shown(plan.unclaimed)}")
            if problems:
                raise WeightMapError(f"strict: {'; '.join(problems)}")
        job.warnings[:0] = problems
        with CheckpointWriter(
            dst,
            job.metas,
            max_shard_size=job.max_shard_size,
            metadata=job.metadata,
            weights_name=_weights_name(reader),
            index_metadata=job.index_metadata,
        ) as writer:
            _copy_other_files(Path(src), writer.staging_dir, job.warnings)
            total = sum(m.nbytes for m in job.metas.values())
            scratch = _Scratch(plan.steps) if _DIRECT_READS else None
            with _progress_bar(progress, total, f"{Path(src).name} -> {Path(dst).name}") as advance:
                for step in plan.steps:
                    _run_step(step, reader, writer.write, scratch)
                    advance(sum(m.nbytes for m in step.target_metas or ()))
        return ConvertReport(
            out_dir=writer.out_dir,
            files=writer.filenames,
            steps=len(plan.steps),
            bytes_read=reader.bytes_read,
            bytes_written=total,
            unclaimed=list(plan.unclaimed),
            unused_rules=unused,
            restored=job.restored,
            warnings=job.warnings,
            seconds=time.perf_counter() - started,
        )


# --------------------------------------------------------------------------------------------------
# planning


def _forward_job(reader: CheckpointReader, weight_map: WeightMap) -> _Job:
    """Convert with ``weight_map`` and record how to undo it."""
    metas = reader.metas()
    plan = weight_map.compile(metas, metas)
    target_metas = plan.target_metas
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
    return _Job(plan, target_metas, DEFAULT_MAX_SHARD_SIZE, metadata, index_metadata, False, [])


def _reverse_job(reader: CheckpointReader, weight_map: WeightMap | None) -> _Job:
    """Undo a conversion: restore the recorded source exactly, or else convert with the inverted map."""
    where = str(reader.path)
    recorded = _read_record(reader)
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
        return _forward_job(reader, inverse)

    metas = reader.metas()
    plan = inverse.compile(metas, metas)
    produced = plan.target_metas
    if produced != recorded.metas:
        raise WeightMapError(
            f"the map does not undo the conversion recorded in {where}: {_diff(produced, recorded.metas)}"
        )
    index_metadata = {k: v for k, v in (recorded.index_metadata or {}).items() if k != "total_size"}
    replay = _replay_split(recorded.files, produced)
    if replay is None:
        warning = (
            f"the source's split into {len(recorded.files)} file(s) cannot be reproduced by a size limit; "
            f"sharding at {DEFAULT_MAX_SHARD_SIZE} instead (the tensors are the source's, bit for bit)"
        )
        return _Job(
            plan, produced, DEFAULT_MAX_SHARD_SIZE, recorded.metadata, index_metadata, True, [warning]
        )
    metas_in_order, limit = replay
    return _Job(plan, metas_in_order, limit, recorded.metadata, index_metadata, True, [])


def _read_record(reader: CheckpointReader) -> _Recorded | None:
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
    return _Recorded(source_metadata, index_metadata, files, metas)


def _diff(produced: dict[str, TensorMeta], expected: dict[str, TensorMeta]) -> str:
    extra = [k for k in produced if k not in expected]
    missing = [k for k in expected if k not in produced]
    changed = [k for k in produced if k in expected and produced[k] != expected[k]]
    parts = []
    if missing:
        parts.append(f"it does not produce {_shown(missing)}")
    if extra:
        parts.append(f"it produces {_shown(extra)}, which the source did not have")
    if changed:
        k = changed[0]
        parts.append(
            f"{len(changed)} tensor(s) come out misshapen, e.g. {k!r} is {produced[k]}, was {expected[k]}"
        )
    return "; ".join(parts) + f" (reverse without --map uses the recorded {MAP_KEY})"


def _replay_split(
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


# --------------------------------------------------------------------------------------------------
# running


def _run_step(step: Step, reader: CheckpointReader, write: _Write, scratch: _Scratch | None) -> None:
    """Read the step's sources, run its ops, write its targets; ``write`` is done with a tensor on return."""
    if scratch is None or step.source_metas is None or step.target_metas is None:
        for target, tensor in zip(step.targets, step.run([reader.get(k) for k in step.sources])):
            write(target, tensor)
        return
    ops = step.ops
    op = ops[0] if ops is not None and len(ops) == 1 else None
    if ops == ():  # a rename, or a key passed through
        for source, target, meta in zip(step.sources, step.targets, step.source_metas):
            write(target, reader.read_into(source, scratch.take([meta])[0]))
    elif hasattr(op, "input_views") and len(step.targets) == 1:
        # concat / stack / conv_to_linear: read every source straight into its place in the result
        [out] = scratch.take(step.target_metas)
        for source, view in zip(step.sources, op.input_views(out), strict=True):
            reader.read_into(source, view)
        write(step.targets[0], out)
    elif isinstance(op, (Split, Unstack)) and op.dim in (0, -len(step.source_metas[0].shape)):
        # a split along the first dim: read each piece on its own, one contiguous run of the file
        if isinstance(op, Split):
            starts = [sum(op.sizes[:i]) for i in range(len(op.sizes) + 1)]
            pieces = [slice(a, b) for a, b in zip(starts, starts[1:])]
        else:
            pieces = list(range(len(step.targets)))
        for target, meta, piece in zip(step.targets, step.target_metas, pieces, strict=True):
            write(target, reader.read_into(step.sources[0], scratch.take([meta])[0], piece))
    else:
        sources = scratch.take(step.source_metas)
        for key, tensor in zip(step.sources, sources):
            reader.read_into(key, tensor)
        for target, tensor in zip(step.targets, step.run(sources)):
            write(target, tensor)


class _Scratch:
    """One buffer that every step reads into in turn.

    Touching fresh memory is slow (each new page faults in, and a large free hands pages back to the
    system), so a tensor allocated per step can cost more than its copy. The buffer is sized for the
    largest step up front but only the pages actually used become resident.
    """

    ALIGN = 64

    def __init__(self, steps: list[Step]):
        need = [
            sum(map(self._span, metas)) for s in steps for metas in (s.source_metas, s.target_metas) if metas
        ]
        self._buffer = torch.empty(max(need, default=0), dtype=torch.uint8)

    def _span(self, meta: TensorMeta) -> int:
        return -(-meta.nbytes // self.ALIGN) * self.ALIGN

    def take(self, metas: tuple[TensorMeta, ...] | list[TensorMeta]) -> list[torch.Tensor]:
        """Tensors of these shapes and dtypes side by side in the buffer, valid until the next call."""
        out, offset = [], 0
        for meta in metas:
            raw = self._buffer[offset : offset + meta.nbytes]
            out.append(raw.view(meta.dtype).view(meta.shape))
            offset += self._span(meta)
        return out


@contextlib.contextmanager
def _progress_bar(enabled: bool, total: int, description: str) -> Iterator[Callable[[int], None]]:
    """A rich progress bar over bytes written, on stderr when it is a terminal; otherwise silent."""
    console = None
    if enabled:
        from rich.console import Console

        console = Console(stderr=True)
    if console is None or not console.is_terminal:
        yield lambda n: None
        return
    from rich import progress as rich

    columns = (
        rich.BarColumn(),
        rich.DownloadColumn(),
        rich.TransferSpeedColumn(),
        rich.TimeRemainingColumn(),
    )
    with rich.Progress(
        rich.TextColumn("{task.description}"), *columns, console=console, transient=True
    ) as bar:
        task = bar.add_task(description, total=total)
        yield lambda n: bar.advance(task, n)


# --------------------------------------------------------------------------------------------------
# paths


def _refuse_overlap(src: Path, dst: Path) -> None:
    """DST is replaced as a whole on commit: it must not be, hold, or sit inside SRC, nor be some other folder."""
    real_src, real_dst = Path(os.path.realpath(src)), Path(os.path.realpath(dst))
    root = real_src if real_src.is_dir() or not real_src.name.endswith(".json") else real_src.parent
    if real_dst == root:
        raise CheckpointError(f"refusing to convert {src} onto itself: DST {dst} is SRC")
    if root in real_dst.parents:
        raise CheckpointError(f"refusing to write DST {dst} inside SRC {src}")
    if real_dst in root.parents:
        raise CheckpointError(f"refusing to write DST {dst}: it contains SRC {src} and would replace it")
    refuse_foreign_dir(dst, "DST")


def _refuse_overlap_files(reader: CheckpointReader, dst: Path) -> None:
    """The same for the files actually read (an index may point elsewhere through symlinks)."""
    real_dst = Path(os.path.realpath(dst))
    for file in reader.files:
        real = Path(os.path.realpath(file))
        if real_dst == real or real_dst in real.parents:
            raise CheckpointError(f"refusing to write DST {dst}: it holds {file}, which SRC reads")


def _weights_name(reader: CheckpointReader) -> str:
    """The source's file name (``model.safetensors``, ``adapter_model.safetensors``, ...), kept in the output."""
    if reader.index_path is None:
        return reader.files[0].name
    name = reader.index_path.name.removesuffix(".index.json")
    return name if name.endswith(".safetensors") else DEFAULT_WEIGHTS_NAME


def _copy_other_files(src: Path, staging: Path, warnings: list[str]) -> None:
    """Copy config.json, tokenizer files and the like from a source directory; never its weights, and
    no symbolic link out of it (`copy_side_files`: each one skipped is a warning)."""
    folder = src if src.is_dir() else src.parent if src.name.endswith(".json") else None
    if folder is None:
        return
    copy_side_files(folder, staging, lambda name: name.endswith(_WEIGHT_SUFFIXES), warnings.append)


def _shown(keys: list[str], limit: int = 5) -> str:
    return ", ".join(keys[:limit]) + (f", ... ({len(keys)} in all)" if len(keys) > limit else "")


# --------------------------------------------------------------------------------------------------
# the command


def run(args: argparse.Namespace) -> int:
    """``splice convert SRC DST --map MAP.json [--reverse] [--max-shard-size SIZE] [--strict]``."""
    if args.map is None and not args.reverse:
        raise WeightMapError("--map MAP.json is required (only --reverse can use the map recorded in SRC)")
    report = convert_checkpoint(
        args.src,
        args.dst,
        args.map,
        reverse=args.reverse,
        max_shard_size=args.max_shard_size,
        progress=not args.quiet,
        strict=args.strict,
    )
    for warning in report.warnings:
        print(f"splice convert: warning: {warning}", file=sys.stderr)
    how = ", restored the recorded source" if report.restored else ""
    print(
        f"wrote {args.dst}: {len(report.files)} file(s), {report.steps} steps, "
        f"{_human(report.bytes_written)} in {report.seconds:.1f}s{how}"
    )
    return 0


def _human(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError  # pragma: no cover
