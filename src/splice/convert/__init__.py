"""``splice convert``: rewrite a safetensors checkpoint into another layout, one rule group at a time.

::

    report = convert_checkpoint("llama", "llama-fused", WeightMap.load("fuse.json"))
    convert_checkpoint("llama-fused", "llama-again", None, reverse=True)   # byte-identical to "llama"

The map is compiled against the source's headers alone, so the output's files are laid out before any
tensor is read. Each compiled step then reads its sources, runs its ops and writes its targets; memory
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

The package: ``jobs`` decides (the compiled map, the output's split, the record for ``--reverse``),
``steps`` runs one step; this module opens, checks and commits.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from splice.checkpoint import CheckpointReader, CheckpointWriter
from splice.checkpoint.reader import DEFAULT_WEIGHTS_NAME
from splice.convert.jobs import (
    MAP_KEY,
    SOURCE_LAYOUT_KEY,
    SOURCE_METADATA_KEY,
    forward_job,
    reverse_job,
    shown_keys,
)
from splice.convert.steps import Scratch, run_step
from splice.errors import CheckpointError, WeightMapError
from splice.tools import carry_side_files, human, progress_bar, refuse_overlap
from splice.weightmap import WeightMap
from splice.weightmap.growth import check_compiled

__all__ = [
    "MAP_KEY",
    "SOURCE_LAYOUT_KEY",
    "SOURCE_METADATA_KEY",
    "ConvertReport",
    "convert_checkpoint",
    "run",
]


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
    refuse_overlap(Path(src), Path(dst))
    with CheckpointReader(src) as reader:
        _refuse_overlap_files(reader, Path(dst))
        job = reverse_job(reader, weight_map) if reverse else forward_job(reader, weight_map)
        # the ops may come from a file: bounded before anything is allocated
        check_compiled(job.compiled, str(src))
        if max_shard_size is not None:
            job.max_shard_size = max_shard_size
            job.warnings = []  # the caller chose the split
        compiled = job.compiled
        unused = [str(r) for r in compiled.unused_rules]
        problems = [f"{len(unused)} rule(s) matched no key: {'; '.join(unused)}"] if unused else []
        if strict:
            if compiled.unclaimed:
                problems.append(
                    f"{len(compiled.unclaimed)} key(s) no rule claims: {shown_keys(compiled.unclaimed)}"
                )
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
            carry_side_files(Path(src), writer.staging_dir, job.warnings.append)
            total = sum(m.nbytes for m in job.metas.values())
            scratch = Scratch(compiled.steps)
            with progress_bar(progress, total, f"{Path(src).name} -> {Path(dst).name}") as advance:
                for step in compiled.steps:
                    run_step(step, reader, writer.write, scratch)
                    advance(sum(m.nbytes for m in step.target_metas or ()))
        return ConvertReport(
            out_dir=writer.out_dir,
            files=writer.filenames,
            steps=len(compiled.steps),
            bytes_read=reader.bytes_read,
            bytes_written=total,
            unclaimed=list(compiled.unclaimed),
            unused_rules=unused,
            restored=job.restored,
            warnings=job.warnings,
            seconds=time.perf_counter() - started,
        )


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
        f"{human(report.bytes_written)} in {report.seconds:.1f}s{how}"
    )
    return 0
