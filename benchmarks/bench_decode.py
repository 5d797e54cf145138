"""Batch-1 greedy decoding with a KV cache on CPU: unfused eager vs splice fused, side by side.

    python benchmarks/bench_decode.py [--workdir bench-out] [--size small|340m] [--tokens 64] [--repeats 3]

Variants (each in a fresh process, same weights, same prompt, identical tokens checked):
- transformers, unfused, eager
- splice fused qkv + gate_up
- splice fused qkv + gate_up + norm_mlp with the rms_norm_gated_mlp kernel
- splice fused qkv + gate_up + norm_mlp with the `compiled` kernel (torch.compile per norm+MLP chain)
- transformers unfused under torch.compile (if it compiles on this machine), and splice fused under it
Target: fused >= 1.1x unfused eager tokens/s.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import LlamaShape, llama_checkpoint, measure, median_of  # noqa: E402

SIZES = {
    "small": LlamaShape(
        hidden_size=512,
        intermediate_size=1376,
        num_hidden_layers=8,
        num_attention_heads=8,
        num_key_value_heads=4,
        vocab_size=8192,
    ),
    "340m": LlamaShape(),
}


def decode(path: str, variant: str, tokens: int) -> dict:
    import time

    import torch
    from transformers import AutoModelForCausalLM

    import splice

    if variant == "unfused":
        model = AutoModelForCausalLM.from_pretrained(path)
    elif variant == "compiled":
        model = AutoModelForCausalLM.from_pretrained(path)
        model.forward = torch.compile(model.forward, dynamic=True)
    else:
        fusion = {"qkv": True, "gate_up": True}
        if variant.startswith("fused+norm_mlp"):
            fusion["norm_mlp"] = True
        model = splice.from_pretrained(AutoModelForCausalLM, path, fusion_config=fusion)
        if variant == "fused+norm_mlp":
            splice.kernels.use_kernel(model, "rms_norm_gated_mlp")
        if variant == "fused+norm_mlp+compiled":
            splice.kernels.use_kernel(model, "compiled")
        if variant == "fused+compiled":
            model.forward = torch.compile(model.forward, dynamic=True)
    prompt = torch.arange(3, 19).unsqueeze(0)
    kwargs = dict(max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)
    with torch.inference_mode():
        model.generate(prompt, max_new_tokens=4, min_new_tokens=4, do_sample=False)  # warm-up (and compile)
        start = time.perf_counter()
        out = model.generate(prompt, **kwargs)
        seconds = time.perf_counter() - start
    return {"tokens_per_s": tokens / seconds, "tokens": out[0, -tokens:].tolist()}


def read_bandwidth(megabytes: int = 512, repeats: int = 5) -> float:
    """Bytes per second that this process's torch threads read from memory (best of ``repeats``)."""
    import time

    import torch

    buffer = torch.ones(megabytes * 2**20 // 4)
    buffer.sum()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        buffer.sum()
        best = min(best, time.perf_counter() - start)
    return buffer.numel() * 4 / best


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--workdir", default="bench-out")
    parser.add_argument("--size", choices=sorted(SIZES), default="small")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    shape = SIZES[args.size]
    path = llama_checkpoint(args.workdir, shape, max_shard_size="200MB")
    print(
        f"checkpoint: {path} ({shape.parameters / 1e6:.0f}M parameters, fp32); {args.tokens} tokens, batch 1, median of {args.repeats}"
    )
    results, reference = {}, None
    for variant in (
        "unfused",
        "fused",
        "fused+norm_mlp",
        "fused+norm_mlp+compiled",
        "compiled",
        "fused+compiled",
    ):
        try:
            m, _ = median_of(
                args.repeats,
                lambda v=variant: measure(
                    "bench_decode:decode", path=str(path), variant=v, tokens=args.tokens
                ),
            )
        except RuntimeError as exc:
            print(f"  {variant:24s} did not run: {str(exc).splitlines()[-1][:160]}")
            continue
        results[variant] = m.result["tokens_per_s"]
        reference = reference or m.result["tokens"]
        same = "same tokens" if m.result["tokens"] == reference else "DIFFERENT TOKENS"
        print(
            f"  {variant:24s} {results[variant]:8.1f} tokens/s  {results[variant] / results['unfused']:5.2f}x unfused  ({same})"
        )
    bandwidth = measure("bench_decode:read_bandwidth").result
    weight_bytes = 4 * (
        shape.parameters - shape.vocab_size * shape.hidden_size
    )  # the embedding is a row lookup
    ceiling = bandwidth / weight_bytes
    print(
        f"  {'memory-bandwidth ceiling':24s} {ceiling:8.1f} tokens/s  ({bandwidth / 1e9:.1f} GB/s read, "
        f"{weight_bytes / 1e6:.0f} MB of weights per token); best variant at "
        f"{max(results.values()) / ceiling:.0%} of it, unfused eager at {results['unfused'] / ceiling:.0%}"
    )
    if "fused" in results:
        ratio = results["fused"] / results["unfused"]
        print(f"target fused >= 1.1x unfused eager: {ratio:.2f}x -> {'met' if ratio >= 1.1 else 'MISSED'}")


if __name__ == "__main__":
    main()
