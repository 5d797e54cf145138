"""Plumbing shared by the commands that write one checkpoint directory from another (``splice convert``,
``splice consolidate``): the overlap check before anything is written, the side files carried over, and
the progress bar.

A command's output replaces DST as a whole when it commits, so DST must not be, hold or sit inside
what is read. Side files (``config.json``, tokenizer files, ...) are copied by
`splice.checkpoint.paths.copy_side_files`, which never follows a symbolic link out of the source
directory.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from pathlib import Path

from splice.checkpoint.atomic import refuse_foreign_dir
from splice.checkpoint.paths import copy_side_files
from splice.errors import CheckpointError

__all__ = [
    "WEIGHT_SUFFIXES",
    "carry_side_files",
    "human",
    "is_weights_file",
    "progress_bar",
    "refuse_overlap",
]

WEIGHT_SUFFIXES = (".safetensors", ".index.json", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf")
"""Files beside the weights that are never carried into an output: they are weights, in some format."""


def is_weights_file(name: str) -> bool:
    return name.endswith(WEIGHT_SUFFIXES)


def refuse_overlap(src: Path, dst: Path, *, src_name: str = "SRC", dst_name: str = "DST") -> None:
    """Refuse a ``dst`` that is, holds or sits inside ``src`` (a directory, an index, whose folder counts,
    or a single file), or that is a directory holding something other than a checkpoint."""
    real_src, real_dst = Path(os.path.realpath(src)), Path(os.path.realpath(dst))
    root = real_src if real_src.is_dir() or not real_src.name.endswith(".json") else real_src.parent
    if real_dst == root:
        raise CheckpointError(f"refusing to write {dst_name} {dst}: it is {src_name} {src}")
    if root in real_dst.parents:
        raise CheckpointError(f"refusing to write {dst_name} {dst} inside {src_name} {src}")
    if real_dst in root.parents:
        raise CheckpointError(
            f"refusing to write {dst_name} {dst}: it contains {src_name} {src} and would replace it"
        )
    refuse_foreign_dir(dst, dst_name)


def carry_side_files(
    src: Path, staging: Path, warn: Callable[[str], None], skip: Callable[[str], bool] = lambda name: False
) -> list[str]:
    """Copy the side files of the checkpoint ``src`` (a directory, or an index: its folder) into ``staging``,
    except weights and what ``skip`` names; nothing for a single weights file. Links out of the folder are
    not followed, each one skipped is a warning (`copy_side_files`). Returns the names copied."""
    folder = src if src.is_dir() else src.parent if src.name.endswith(".json") else None
    if folder is None:
        return []
    return copy_side_files(folder, staging, lambda name: is_weights_file(name) or skip(name), warn)


@contextlib.contextmanager
def progress_bar(enabled: bool, total: int, description: str) -> Iterator[Callable[[int], None]]:
    """A rich progress bar over bytes written, on stderr when it is a terminal; otherwise silent.

    Yields the function that advances it by a number of bytes.
    """
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


def human(n: float) -> str:
    """``1.4 GB``: a byte count for people (powers of 1000)."""
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError  # pragma: no cover
