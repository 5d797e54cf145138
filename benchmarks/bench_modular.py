"""How fast `splice modular` converts the transformers corpus (run by hand, not by pytest).

    python benchmarks/bench_modular.py [--limit N]

Prints the median and 90th-percentile seconds per file (one process, files converted in turn, so
parents parsed for one file are reused by the next, as in a real run), then the wall time of the whole
corpus through the CLI with ``--jobs 2`` (written to a temporary folder, ruff formatting included).
"""

from __future__ import annotations

import argparse
import importlib.util
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


def per_file(files: list[Path]) -> list[float]:
    from splice.modular import convert_file

    timings = []
    for path in files:
        start = time.perf_counter()
        convert_file(path)
        timings.append(time.perf_counter() - start)
    return timings


def whole_corpus(files: list[Path], jobs: int) -> float:
    with tempfile.TemporaryDirectory() as out:
        command = [sys.executable, "-m", "splice.cli", "modular", *map(str, files), "--output-dir", out]
        start = time.perf_counter()
        subprocess.run([*command, "--jobs", str(jobs)], check=True, capture_output=True)
        return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--limit", type=int, default=None, help="only the first N files")
    parser.add_argument("--jobs", type=int, default=2)
    args = parser.parse_args()
    files = corpus()[: args.limit]

    timings = per_file(files)
    ordered = sorted(timings)
    slowest = max(zip(timings, files, strict=True))
    print(f"files:                         {len(files)}")
    print(f"median s/file (1 process):     {statistics.median(timings):.3f}")
    print(f"p90 s/file:                    {ordered[int(0.9 * (len(ordered) - 1))]:.3f}")
    print(f"slowest:                       {slowest[0]:.3f} ({slowest[1].parent.name})")
    print(f"sum over files (1 process):    {sum(timings):.1f} s")
    wall = whole_corpus(files, args.jobs)
    print(f"corpus wall time, --jobs {args.jobs}:   {wall:.1f} s  (target < 60 s for 326 files)")


if __name__ == "__main__":
    main()
