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
import json
import os
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from splice.checkpoint import DTYPE_OF_TAG, TAG_OF_DTYPE, CheckpointReader, CheckpointWriter
from splice.errors import CheckpointError, WeightMapError
from splice.parallel.shards import FORMAT, METADATA_NAME, RANK_KEY, WORLD_KEY
from splice.transforms import TensorMeta
from splice.weightmap import WeightMap

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
    _refuse_overlap(shards_dir, out)
    tensors = _tensors(document, shards_dir)
    readers = open_shards(shards_dir, document, tensors)
    warnings: list[str] = []
    try:
        metas = {key: t.meta for key, t in tensors.items()}
        try:
            inverse = WeightMap.from_dict(document["weight_map"]).invert()
            plan = inverse.compile(list(metas), metas)
        except WeightMapError as exc:
            raise CheckpointError(
                f"{shards_dir / METADATA_NAME}: its weight_map does not fit its tensors: {exc}"
            ) from None
        produced = plan.target_metas
        source = document.get("source") or {}
        writer_args, more = _like_source(source, produced)
        warnings += more
        with CheckpointWriter(out, **writer_args) as writer:
            _copy_other_files(shards_dir, writer.staging_dir, document)
            total = sum(m.nbytes for m in produced.values())
            with _progress_bar(progress, total, f"{shards_dir.name} -> {out.name}") as advance:
                for step in plan.steps:
                    inputs = [_assemble(readers, key, tensors[key]) for key in step.sources]
                    for key, tensor in zip(step.targets, step.run(inputs)):
                        writer.write(key, tensor)
                    del inputs
                    advance(sum(m.nbytes for m in step.target_metas or ()))
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


# --------------------------------------------------------------------------------------------------
# reading and checking the shards


def read_metadata(shards_dir: Path) -> dict[str, Any]:
    path = Path(shards_dir) / METADATA_NAME
    if not Path(shards_dir).is_dir():
        raise CheckpointError(f"{shards_dir}: no such directory")
    try:
        document = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(
            f"{shards_dir}: no {METADATA_NAME}; it is not a directory written by splice.parallel.save_shards"
        ) from None
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: unreadable: {exc}") from None
    if not isinstance(document, dict) or document.get("format") != FORMAT or document.get("version") != 1:
        raise CheckpointError(f"{path}: not a {FORMAT} version 1 document")
    for name in ("world_size", "files", "tensors", "weight_map"):
        if name not in document:
            raise CheckpointError(f"{path}: has no {name!r}")
    return document


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
    for rank, name in enumerate(files):
        if not (shards_dir / name).is_file():
            raise CheckpointError(f"{shards_dir}: shard {name} (rank {rank} of {world}) is missing")
    extra = sorted(p.name for p in shards_dir.glob("*.safetensors") if p.name not in files)
    if extra:
        raise CheckpointError(
            f"{shards_dir}: unexpected shard file {extra[0]}; {METADATA_NAME} lists {world} ranks: {', '.join(files)}"
        )
    readers: list[CheckpointReader] = []
    try:
        for rank, name in enumerate(files):
            reader = CheckpointReader(shards_dir / name)
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


def _copy_other_files(shards_dir: Path, staging: Path, document: dict[str, Any]) -> None:
    skip = set(document["files"]) | {METADATA_NAME}
    for path in sorted(shards_dir.iterdir()):
        if (
            path.name in skip
            or path.name.startswith(".")
            or not path.is_file()
            or path.suffix == ".safetensors"
        ):
            continue
        shutil.copyfile(path, staging / path.name)


def _refuse_overlap(shards_dir: Path, out: Path) -> None:
    src, dst = Path(os.path.realpath(shards_dir)), Path(os.path.realpath(out))
    if dst == src or src in dst.parents or dst in src.parents:
        raise CheckpointError(f"refusing to write {out}: it overlaps the shards directory {shards_dir}")


class _progress_bar:
    """A rich progress bar over bytes written, on stderr when it is a terminal; otherwise silent."""

    def __init__(self, enabled: bool, total: int, description: str):
        self._progress = None
        if enabled:
            from rich.console import Console

            console = Console(stderr=True)
            if console.is_terminal:
                from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn

                self._progress = Progress(
                    TextColumn("{task.description}"),
                    BarColumn(),
                    DownloadColumn(),
                    TimeRemainingColumn(),
                    console=console,
                    transient=True,
                )
                self._task = self._progress.add_task(description, total=total)

    def __enter__(self) -> Callable[[int], None]:
        if self._progress is None:
            return lambda n: None
        self._progress.start()
        return lambda n: self._progress.advance(self._task, n)

    def __exit__(self, *exc_info: object) -> None:
        if self._progress is not None:
            self._progress.stop()


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
