"""``splice modular PATH... [--output-dir DIR] [--check] [--jobs N]``."""

from __future__ import annotations

import argparse
import difflib
import logging
import os
import sys
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from splice.modular.convert import convert_file
from splice.modular.errors import ModularError
from splice.modular.split import MODULAR_NAME


@dataclass
class Result:
    modular: Path
    outputs: dict[str, str] = field(default_factory=dict)
    error: str | None = None
    warnings: list[str] = field(default_factory=list)


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def convert_one(path: Path) -> Result:
    """Convert one file, catching its error and warnings so a batch can report them all."""
    collector = _Collect()
    logger = logging.getLogger("splice.modular")
    logger.addHandler(collector)
    previous_propagate, logger.propagate = logger.propagate, False
    try:
        return Result(path, outputs=convert_file(path), warnings=collector.messages)
    except ModularError as exc:
        return Result(path, error=str(exc), warnings=collector.messages)
    except Exception as exc:  # a converter bug must not take the rest of a batch down with it
        message = f"{path}: internal error ({type(exc).__name__}: {exc}); please report it with this file"
        return Result(path, error=message, warnings=collector.messages)
    finally:
        logger.removeHandler(collector)
        logger.propagate = previous_propagate


def find_modular_files(paths: list[str]) -> list[Path]:
    found: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            found.extend(sorted(path.rglob("modular_*.py")))
        elif path.is_file():
            if not MODULAR_NAME.match(path.name):
                raise ModularError("expected a modular_<model>.py file", path)
            found.append(path)
        else:
            raise ModularError("no such file or folder", path)
    unique = list(dict.fromkeys(p.resolve() for p in found))
    if not unique:
        raise ModularError(f"found no modular_*.py file under {', '.join(paths)}")
    return unique


def _convert_all(files: list[Path], jobs: int) -> list[Result]:
    if len(files) == 1:  # no progress bar to draw: rich is not even imported (a tenth of a second per run)
        return [convert_one(files[0])]
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    console = Console(stderr=True)
    show = console.is_terminal
    columns = (TextColumn("splice modular"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    results: list[Result] = []
    with Progress(*columns, console=console, transient=True, disable=not show) as progress:
        task = progress.add_task("convert", total=len(files))
        if jobs > 1 and len(files) > 1:
            with ProcessPoolExecutor(max_workers=min(jobs, len(files))) as pool:
                for result in pool.map(convert_one, files, chunksize=1):
                    results.append(result)
                    progress.advance(task)
        else:
            for path in files:
                results.append(convert_one(path))
                progress.advance(task)
    return results


def _targets(result: Result, output_dir: Path | None) -> dict[Path, str]:
    folder = output_dir if output_dir is not None else result.modular.parent
    return {folder / name: text for name, text in result.outputs.items()}


def run(args: argparse.Namespace) -> int:
    if args.jobs < 1:
        raise ModularError(f"--jobs must be at least 1, got {args.jobs}")
    files = find_modular_files(list(args.paths))
    output_dir = Path(args.output_dir) if args.output_dir else None
    if output_dir is not None and output_dir.exists() and not output_dir.is_dir():
        raise ModularError("--output-dir must be a folder, and this is a file", output_dir)
    results = _convert_all(files, args.jobs)

    for result in results:
        for message in result.warnings:
            print(f"splice modular: warning: {message}", file=sys.stderr)
    errors = [r.error for r in results if r.error]
    if errors:
        more = f"\n({len(errors) - 1} more file(s) failed, listed above)" if len(errors) > 1 else ""
        for message in errors[1:]:
            print(f"splice modular: error: {message}", file=sys.stderr)
        raise ModularError(errors[0] + more)

    _refuse_shared_targets(results, output_dir)
    try:
        if args.check:
            return _check(results, output_dir)
        return _write(results, output_dir)
    except BrokenPipeError:
        # The reader went away (`splice modular --check | head`): stop quietly, as other tools do.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


def _refuse_shared_targets(results: list[Result], output_dir: Path | None) -> None:
    """Two modular files generating the same path would overwrite each other: refuse before writing."""
    source_of: dict[Path, Path] = {}
    for result in results:
        for target in _targets(result, output_dir):
            first = source_of.setdefault(target, result.modular)
            if first != result.modular:
                raise ModularError(
                    f"{first} and {result.modular} both generate {target}; "
                    "convert them into different --output-dir folders"
                )


def _write(results: list[Result], output_dir: Path | None) -> int:
    if output_dir is not None:
        try:
            output_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ModularError(f"cannot create --output-dir: {exc.strerror}", output_dir) from None
    written = unchanged = 0
    for result in results:
        for target, text in _targets(result, output_dir).items():
            if target.is_file() and target.read_text(encoding="utf-8") == text:
                unchanged += 1
                continue
            target.write_text(text, encoding="utf-8")
            written += 1
            print(f"wrote {target}")
    print(f"splice modular: {len(results)} modular file(s), {written} file(s) written, {unchanged} unchanged")
    return 0


def _check(results: list[Result], output_dir: Path | None) -> int:
    stale = 0
    for result in results:
        for target, text in _targets(result, output_dir).items():
            current = target.read_text(encoding="utf-8") if target.is_file() else ""
            if current == text:
                continue
            stale += 1
            diff = difflib.unified_diff(
                current.splitlines(keepends=True),
                text.splitlines(keepends=True),
                fromfile=f"{target} (on disk)" if target.is_file() else f"{target} (missing)",
                tofile=f"{target} (generated from {result.modular.name})",
            )
            sys.stdout.writelines(diff)
    if stale:
        print(
            f"splice modular: {stale} generated file(s) are stale; run `splice modular` to update them",
            file=sys.stderr,
        )
        return 1
    print(f"splice modular: {len(results)} modular file(s) checked, all generated files are up to date")
    return 0
