"""How fast `splice modular` converts the transformers corpus (run by hand, not by pytest).

    python benchmarks/bench_modular.py [--limit N]

Prints the median and 90th-percentile seconds per file (one process, files converted in turn, so
parents parsed for one file are reused by the next, as in a real run), then the wall time of the whole
corpus through the CLI with ``--jobs 2`` (written to a temporary folder, ruff formatting included),
then what a user pays per ``splice modular FILE``: a fresh process per file, beside the bare
interpreter and ``import splice`` measured the same way (best of ``--repeat`` runs each, so the
numbers show the work, not the machine's other load; goal: at most 0.5 s per file).
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


def fresh_process(command: list[str], repeat: int) -> tuple[float, float]:
    """Best-of-``repeat`` wall seconds of ``command`` in a new process, and the CPU seconds of that run."""
    best = (float("inf"), 0.0)
    for _ in range(repeat):
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        start = time.perf_counter()
        subprocess.run(command, check=True, capture_output=True)
        wall = time.perf_counter() - start
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        best = min(best, (wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)))
    return best


def per_invocation(files: list[Path], count: int, repeat: int) -> None:
    """``splice modular FILE`` as a user runs it, one process per file, for ``count`` files across the corpus."""
    chosen = files[:: max(1, len(files) // count)][:count]
    python = [sys.executable]
    startup = fresh_process([*python, "-c", "pass"], repeat)
    imported = fresh_process([*python, "-c", "import splice"], repeat)
    probe = "import splice, sys; print('torch' in sys.modules)"
    torch_loaded = subprocess.run(
        [*python, "-c", probe], check=True, capture_output=True, text=True
    ).stdout.strip()
    with tempfile.TemporaryDirectory() as out:
        runs = [
            fresh_process([*python, "-m", "splice.cli", "modular", str(path), "--output-dir", out], repeat)
            for path in chosen
        ]
    walls = sorted(wall for wall, _ in runs)
    median_wall = statistics.median(walls)
    print(f"per invocation (fresh process, best of {repeat}, {len(chosen)} files):")
    print(f"  python -c pass:              {startup[0]:.3f} s wall, {startup[1]:.3f} CPU")
    print(
        f"  python -c 'import splice':   {imported[0]:.3f} s wall, {imported[1]:.3f} CPU (imports torch: {torch_loaded})"
    )
    print(
        f"  splice modular FILE:         median {median_wall:.3f} s wall, {statistics.median(c for _, c in runs):.3f} CPU; "
        f"slowest {walls[-1]:.3f} s; {median_wall / startup[0]:.1f}x the bare interpreter"
    )
    print(f"  goal <= 0.5 s/file:          {'met' if median_wall <= 0.5 else 'NOT met'} (median)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--limit", type=int, default=None, help="only the first N files")
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--invocations", type=int, default=8, help="files run one process each")
    parser.add_argument(
        "--repeat", type=int, default=3, help="runs per fresh-process measurement (best kept)"
    )
    parser.add_argument("--only-invocations", action="store_true", help="skip the in-process and corpus runs")
    args = parser.parse_args()
    files = corpus()[: args.limit]
    if args.only_invocations:
        print(f"load average before:           {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores")
        per_invocation(files, args.invocations, args.repeat)
        return

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
    per_invocation(files, args.invocations, args.repeat)
    print(f"load average after:            {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
