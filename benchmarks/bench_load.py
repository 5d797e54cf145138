"""Load + first forward of a ~340M Llama-style fp32 checkpoint (3 shards): plain transformers, transformers'
own fused route, and splice, each in a fresh process, side by side in one run.

    python benchmarks/bench_load.py [--workdir bench-out] [--repeats 5]

Imports happen before the clock starts. Plain transformers memory-maps the weights, so the load alone hides the cost: each variant is timed
through its first forward pass (batch 1, 32 tokens). Peak RSS is the child's maximum resident set.
Also printed: the memcpy limit (reading every byte of the checkpoint into memory) and splice
loading unfused. Targets: splice <= 1.5x plain's time and <= plain's peak RSS + 10%.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _hf_fused_route  # noqa: E402  (registers nothing until load() is called)
import torch  # noqa: E402
from _common import LlamaShape, human, llama_checkpoint, measure, median_of, summarize, warm_page_cache  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402
from transformers.models.llama import modeling_llama  # noqa: E402, F401  (imported before the clock starts)

import splice  # noqa: E402
import splice.fusion  # noqa: E402, F401  (`import splice` is lazy: the load path's modules before the clock)
import splice.hf  # noqa: E402, F401

FUSION = {"qkv": True, "gate_up": True}


def _first_forward(model) -> float:
    ids = torch.arange(3, 35).unsqueeze(0)
    with torch.no_grad():
        return float(model(ids).logits[0, -1, :4].sum())


def plain(path: str) -> float:
    return _first_forward(AutoModelForCausalLM.from_pretrained(path))


def hf_fused(path: str) -> float:
    return _first_forward(_hf_fused_route.load(path))


def splice_load(path: str, fused: bool) -> float:
    return _first_forward(
        splice.from_pretrained(AutoModelForCausalLM, path, fusion_config=FUSION if fused else {})
    )


def read_all(path: str) -> int:
    """The memcpy limit: every byte of the checkpoint into fresh memory, one thread (what a copying loader must do)."""
    total = 0
    for file in sorted(Path(path).glob("*.safetensors")):
        size = file.stat().st_size
        buffer = torch.empty(size, dtype=torch.uint8)
        with open(file, "rb", buffering=0) as f:
            f.readinto(memoryview(buffer.numpy()))
        total += size
    return total


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--workdir", default="bench-out")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    shape = LlamaShape()
    path = llama_checkpoint(args.workdir, shape)
    print(
        f"checkpoint: {path} ({shape.parameters / 1e6:.0f}M parameters, fp32, {len(list(path.glob('*.safetensors')))} shards)"
    )
    print(
        f"page cache warmed with {human(warm_page_cache(path))}; each run is a fresh process; median of {args.repeats}"
    )
    variants = {
        "memcpy limit (read every byte)": lambda: measure("bench_load:read_all", path=str(path)),
        "transformers (unfused)": lambda: measure("bench_load:plain", path=str(path)),
        "transformers fused route": lambda: measure("bench_load:hf_fused", path=str(path)),
        "splice fused (qkv+gate_up)": lambda: measure("bench_load:splice_load", path=str(path), fused=True),
        "splice unfused": lambda: measure("bench_load:splice_load", path=str(path), fused=False),
    }
    results = {}
    for name, run in variants.items():
        results[name], runs = median_of(args.repeats, run)
        print(
            f"  {name:32s} {results[name].seconds:6.2f} s  peak RSS {human(results[name].peak_rss):>9s}  ({summarize(runs)})"
        )
    plain_m = results["transformers (unfused)"]
    print("\nratios against plain transformers (time, peak RSS):")
    for name, m in results.items():
        print(f"  {name:32s} {m.seconds / plain_m.seconds:5.2f}x  {m.peak_rss / plain_m.peak_rss:5.2f}x")
    sp = results["splice fused (qkv+gate_up)"]
    print(
        f"\nsplice fused vs transformers fused route: {sp.seconds / results['transformers fused route'].seconds:.2f}x time, "
        f"{sp.peak_rss / results['transformers fused route'].peak_rss:.2f}x peak RSS"
    )
    print(
        f"splice fused vs memcpy limit: {sp.seconds / results['memcpy limit (read every byte)'].seconds:.2f}x time"
    )
    print(
        f"targets: time <= 1.5x plain -> {'met' if sp.seconds <= 1.5 * plain_m.seconds else 'MISSED'}; "
        f"peak RSS <= plain + 10% -> {'met' if sp.peak_rss <= 1.1 * plain_m.peak_rss else 'MISSED'}"
    )


if __name__ == "__main__":
    main()
