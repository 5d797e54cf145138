"""How fast `splice modular` converts the transformers corpus (run by hand, not by pytest).

    python benchmarks/bench_modular.py [--limit N]

Prints the median and 90th-percentile seconds per file (one process, files converted in turn, so
parents parsed for one file are reused by the next, as in a real run), then the wall time of the whole
corpus through the CLI with ``--jobs 2`` (written to a temporary folder, ruff formatting included).
CPU seconds are printed beside wall seconds, with the load average: on a shared machine the wall
times mostly measure the other work.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def corpus() -> list[Path]:
    spec = importlib.util.find_spec("transformers")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("transformers is not installed: nothing to benchmark")
    return sorted((Path(spec.submodule_search_locations[0]) / "models").glob("*/modular_*.py"))


def per_file(files: list[Path]) -> tuple[list[float], list[float]]:
    """Wall and CPU seconds of each file, converted in turn in this process."""
    from splice.modular import convert_file

    wall, cpu = [], []
    for path in files:
        start, start_cpu = time.perf_counter(), time.process_time()
        convert_file(path)
        wall.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    return wall, cpu


def whole_corpus(files: list[Path], jobs: int) -> tuple[float, float]:
    """Wall seconds of one CLI run over all files, and the CPU seconds it used (all processes)."""
    with tempfile.TemporaryDirectory() as out:
        command = [sys.executable, "-m", "splice.cli", "modular", *map(str, files), "--output-dir", out]
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        start = time.perf_counter()
        subprocess.run([*command, "--jobs", str(jobs)], check=True, capture_output=True)
        wall = time.perf_counter() - start
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--limit", type=int, default=None, help="only the first N files")
    parser.add_argument("--jobs", type=int, default=2)
    args = parser.parse_args()
    files = corpus()[: args.limit]

    # Other work on the machine slows every number here; CPU seconds show what the converter itself costs.
    print(f"load average before:           {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores")
    wall, cpu = per_file(files)
    ordered = sorted(wall)
    slowest = max(zip(wall, files, strict=True))
    print(f"files:                         {len(files)}")
    print(
        f"median s/file (1 process):     {statistics.median(wall):.3f} wall, {statistics.median(cpu):.3f} CPU"
    )
    print(f"p90 s/file:                    {ordered[int(0.9 * (len(ordered) - 1))]:.3f} wall")
    print(f"slowest:                       {slowest[0]:.3f} ({slowest[1].parent.name})")
    print(f"sum over files (1 process):    {sum(wall):.1f} s wall, {sum(cpu):.1f} s CPU")
    corpus_wall, corpus_cpu = whole_corpus(files, args.jobs)
    print(
        f"corpus, CLI --jobs {args.jobs}:         {corpus_wall:.1f} s wall, {corpus_cpu:.1f} s CPU in all processes"
    )
    print(f"load average after:            {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
