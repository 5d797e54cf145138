"""splice convert, side by side with the two copies that bound it.

    .venv/bin/python benchmarks/bench_convert.py [--workdir ./bench-out] [--repeats 3]

Each variant runs in a fresh process and converts or copies the same ~340M-parameter float32 Llama
checkpoint (3 shards, 1.36 GB):

- **safetensors copy**: ``load_file`` + ``save_file`` per shard with the safetensors library, the
  plain read-and-write that ``convert`` competes with;
- **byte copy**: ``shutil.copyfile`` per file (what ``cp`` does), the disk / memcpy limit;
- **convert**: ``splice convert`` to fused q/k/v and gate/up;
- **convert --reverse**: back to the original layout;
- **convert, no rules**: every tensor passes through, the streaming cost of ``convert`` on its own;
- **compile only**: what ``convert`` does before the first byte of data (headers, compiling the map).

Two rounds: first every variant writes to the page cache only (``fsync`` disabled in the child, and
``os.sync()`` between runs so one run's write-back does not slow the next), which exposes CPU and
memcpy overhead; then every variant makes its files durable with ``fsync``, as ``convert``'s atomic
commit does, which is disk bound. The source is read once before measuring, so all reads come from
the page cache. Variants run interleaved, shuffled each round; times are medians (and minimums),
measured inside the child around the call alone; peak RSS is the child's high-water mark during the
call (see ``_common.measure``).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

import safetensors
import safetensors.torch
import torch  # noqa: F401  (every variant pays the same imports, so the RSS baselines match)

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402
    LlamaShape,
    Measurement,
    human,
    interleaved,
    llama_checkpoint,
    measure,
    median,
    summarize,
    tree_size,
    warm_page_cache,
)

import splice.convert  # noqa: E402
from splice.checkpoint import CheckpointReader  # noqa: E402
from splice.weightmap import WeightMap  # noqa: E402

FUSE_RULES = [
    "model.layers.*.self_attn.{q,k,v}_proj.weight -> model.layers.*.self_attn.qkv_proj.weight | concat(dim=0)",
    "model.layers.*.mlp.{gate,up}_proj.weight -> model.layers.*.mlp.gate_up_proj.weight | concat(dim=0)",
]


# ------------------------------------------------------------------------------- the measured functions


def _no_fsync(durable: bool) -> None:
    if not durable:
        os.fsync = lambda fd: None  # this child only: measure the work, not the disk


def _finish(path: Path, durable: bool) -> None:
    if durable:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def copy_with_safetensors(src: str, dst: str, durable: bool) -> None:
    os.makedirs(dst)
    for path in sorted(Path(src).iterdir()):
        if path.name.startswith("."):
            continue
        out = Path(dst) / path.name
        if path.suffix == ".safetensors":
            with safetensors.safe_open(path, "pt") as f:
                metadata = f.metadata()
            tensors = safetensors.torch.load_file(path)
            safetensors.torch.save_file(tensors, out, metadata=metadata)
            del tensors
        else:
            shutil.copyfile(path, out)
        _finish(out, durable)


def copy_bytes(src: str, dst: str, durable: bool) -> None:
    os.makedirs(dst)
    for path in sorted(Path(src).iterdir()):
        if not path.name.startswith("."):
            shutil.copyfile(path, Path(dst) / path.name)
            _finish(Path(dst) / path.name, durable)


def convert(src: str, dst: str, map_path: str | None, reverse: bool, durable: bool) -> dict:
    _no_fsync(durable)
    report = splice.convert.convert_checkpoint(src, dst, map_path, reverse=reverse, progress=False)
    return {"steps": report.steps, "bytes_written": report.bytes_written}


def compile_only(src: str, map_path: str) -> None:
    """What convert does before the first byte of data: read the headers, compile and resolve the map."""
    wm = WeightMap.load(map_path)
    with CheckpointReader(src) as reader:
        metas = reader.metas()
    wm.compile(metas, metas)
    wm.resolve(metas)


# ------------------------------------------------------------------------------------------------ main


def largest_steps(src: Path, wm: WeightMap) -> tuple[tuple[int, str], tuple[int, str]]:
    """(bytes, targets) of the largest step, and of the largest step that runs an op."""
    with CheckpointReader(src) as reader:
        metas = reader.metas()
    sized = [
        (sum(m.nbytes for m in s.target_metas), ", ".join(s.targets), s.rule)
        for s in wm.compile(metas, metas).steps
    ]
    overall = max(sized)
    fused = max(item for item in sized if item[2] is not None)
    return overall[:2], fused[:2]


def print_round(runs: dict[str, list[Measurement]], source_bytes: int, step_bytes: int) -> None:
    results = {name: median(measured) for name, measured in runs.items()}
    fastest = {name: min(m.seconds for m in measured) for name, measured in runs.items()}
    print(
        f"{'variant':<28}{'median':>8}{'min':>7}{'GB/s':>7}{'peak RSS':>11}{'over base':>11}   all runs (s)"
    )
    for name, m in results.items():
        print(
            f"{name:<28}{m.seconds:>7.2f}s{fastest[name]:>6.2f}s{source_bytes / m.seconds / 1e9:>7.2f}"
            f"{human(m.peak_rss):>11}{human(m.added_rss):>11}   {summarize(runs[name])}"
        )

    def ratio(a: str, b: str, minus: str | None = None) -> str:
        """a / b for the medians and for the fastest runs, less ``minus`` from a."""
        med = (results[a].seconds - (results[minus].seconds if minus else 0)) / results[b].seconds
        low = (fastest[a] - (fastest[minus] if minus else 0)) / fastest[b]
        return f"{med:.2f}x median, {low:.2f}x fastest"

    plain, conv = results["safetensors copy"], results["convert"]
    print(f"  convert / safetensors copy:            {ratio('convert', 'safetensors copy')} (target <= 1.3x)")
    print(f"  convert --reverse / safetensors copy:  {ratio('convert --reverse', 'safetensors copy')}")
    print(f"  convert / byte copy:                   {ratio('convert', 'byte copy (cp)')}")
    print(
        f"  convert with no rules / safetensors:   {ratio('convert, no rules (a copy)', 'safetensors copy')}"
    )
    print(
        f"  (convert - compile only) / safetensors: {ratio('convert', 'safetensors copy', minus=COMPILE_ONLY)}"
    )
    bound = 1.1 * plain.peak_rss + step_bytes
    print(
        f"  convert peak RSS {human(conv.peak_rss)} vs safetensors copy {human(plain.peak_rss)}: "
        f"{conv.peak_rss / plain.peak_rss:.2f}x (target <= 1.1 x copy + largest step = {human(bound)}: "
        f"{'met' if conv.peak_rss <= bound else 'MISSED'})"
    )
    added = {name: human(m.added_rss) for name, m in results.items()}
    print(
        f"  RSS added to the {human(plain.baseline_rss)} interpreter + imports: convert {added['convert']} "
        f"(compile only {added[COMPILE_ONLY]}, largest step {human(step_bytes)}), "
        f"reverse {added['convert --reverse']}, "
        f"safetensors copy {added['safetensors copy']}"
    )


COMPILE_ONLY = "convert: compile only, no data"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default="./bench-out", help="where the checkpoints go (reused)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--only", choices=["cache", "durable"], help="run one round only")
    args = parser.parse_args()
    workdir = Path(args.workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)

    shape = LlamaShape()
    started = time.perf_counter()
    src = llama_checkpoint(workdir, shape, max_shard_size="500MB")
    source_bytes = tree_size(src)
    print(f"checkpoint: {src} ({time.perf_counter() - started:.1f}s to generate or find)")
    print(
        f"  {shape.parameters / 1e6:.1f}M float32 parameters, {human(source_bytes)} in "
        f"{len(list(src.glob('*.safetensors')))} shards; hidden {shape.hidden_size}, intermediate "
        f"{shape.intermediate_size}, {shape.num_hidden_layers} layers, {shape.num_attention_heads}/"
        f"{shape.num_key_value_heads} heads, vocab {shape.vocab_size}"
    )
    map_path = workdir / "fuse.json"
    map_path.write_text(json.dumps({"rules": FUSE_RULES}, indent=2) + "\n")
    copy_map = workdir / "copy.json"  # no rules: every tensor passes through, as in a plain copy
    copy_map.write_text('{"rules": []}\n')
    (step_bytes, step_name), (fused_bytes, fused_name) = largest_steps(src, WeightMap.load(map_path))
    print(f"  largest step: {human(step_bytes)} ({step_name}, copied unchanged)")
    print(f"  largest fusing step: {human(fused_bytes)} ({fused_name})")

    fused = workdir / "fused"  # the input of --reverse
    if not (fused / "model.safetensors").is_file():
        splice.convert.convert_checkpoint(src, fused, map_path, progress=False)
    warmed = warm_page_cache(src) + warm_page_cache(fused)
    print(f"warm-up: read {human(warmed)} so that every read below comes from the page cache")

    out = workdir / "out"

    def cleanup() -> None:
        shutil.rmtree(out, ignore_errors=True)
        os.sync()

    cleanup()
    for round_ in ["cache", "durable"] if args.only is None else [args.only]:
        durable = round_ == "durable"
        what = (
            "every variant fsyncs its files"
            if durable
            else "page cache only, fsync disabled in every variant"
        )
        print(f"\n== {round_}: {what}; {args.repeats} rounds, variants shuffled each round ==")
        copy = {"src": str(src), "dst": str(out), "durable": durable}
        forward = {**copy, "map_path": str(map_path), "reverse": False}
        variants = {
            "safetensors copy": ("copy_with_safetensors", copy),
            "byte copy (cp)": ("copy_bytes", copy),
            "convert": ("convert", forward),
            "convert, no rules (a copy)": ("convert", {**forward, "map_path": str(copy_map)}),
            COMPILE_ONLY: ("compile_only", {"src": str(src), "map_path": str(map_path)}),
            "convert --reverse": ("convert", {**forward, "src": str(fused), "map_path": None, "reverse": True}),
        }  # fmt: skip
        calls = {
            name: lambda f=f, k=k: measure(f"bench_convert:{f}", **k) for name, (f, k) in variants.items()
        }
        print_round(interleaved(args.repeats, calls, cleanup), source_bytes, step_bytes)

    splice.convert.convert_checkpoint(fused, out, None, reverse=True, progress=False)
    same = all(
        (out / p.name).read_bytes() == p.read_bytes() for p in src.iterdir() if not p.name.startswith(".")
    )
    print(f"\nconvert then --reverse == source, byte for byte: {same}")
    cleanup()


if __name__ == "__main__":
    main()
