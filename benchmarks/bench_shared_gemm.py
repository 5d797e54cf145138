"""What sharing one fused GEMM between a fused Linear's slices would buy: batch-1 greedy decoding.

    python benchmarks/bench_shared_gemm.py [--workdir bench-out] [--size small|340m] [--tokens 16] [--rounds 15]

A model fused qkv + gate_up runs its attention and MLP as written, so ``q_proj(x)``, ``k_proj(x)``
and ``v_proj(x)`` are three calls on `LinearSlice` stand-ins. Two ways to serve them:
- ``rows`` (what splice does): each slice multiplies by its own rows of the fused weight;
- ``shared``: the first slice runs the whole fused GEMM and its siblings read the cached output
  (an unchecked cache: the upper bound of what any cache could buy; splice dropped its cache because
  inference tensors and ``.data`` writes cannot be checked for staleness).
One process, one model; the two alternate every round of ``--tokens`` tokens (so load drift on a
shared machine hits both alike), and the best round of each is compared. Identical tokens are checked.
Then the q/k/v step alone, at 1 and 128 tokens.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import llama_checkpoint, measure  # noqa: E402
from bench_decode import SIZES  # noqa: E402


def _shared_call(self, x, index):
    """The fused GEMM once per group of sibling calls with the same input object; no staleness checks."""
    cache = self.__dict__.get("_bench_cache")
    bit = 1 << index
    if cache is not None and cache[0] is x and not cache[2] & bit:
        pieces, read = cache[1], cache[2] | bit
    else:
        module = self.fused
        output = module(x)
        pieces, read = output.split([b - a for a, b in self.bounds], dim=-1), bit
    self.__dict__["_bench_cache"] = None if read == (1 << len(self.bounds)) - 1 else (x, pieces, read)
    return pieces[index]


def decode(path: str, tokens: int, rounds: int, mode: str, threads: int) -> dict:
    import time

    import torch

    torch.set_num_threads(threads)
    from transformers import AutoModelForCausalLM

    import splice
    from splice.fusion.linear import SharedGEMM

    rows_call = SharedGEMM.__call__
    calls = {"rows": rows_call, "shared": _shared_call}
    model = splice.from_pretrained(AutoModelForCausalLM, path, fusion_config={"qkv": True, "gate_up": True})
    prompt = torch.arange(3, 19).unsqueeze(0)
    kwargs = dict(max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)
    best = {name: float("inf") for name in calls}
    best_cpu = dict(best)
    outputs = {}
    context = torch.inference_mode if mode == "inference_mode" else torch.no_grad
    with context():
        for round_ in range(rounds + 1):
            for name in calls if round_ % 2 else reversed(list(calls)):
                SharedGEMM.__call__ = calls[name]
                start, start_cpu = time.perf_counter(), time.process_time()
                out = model.generate(prompt, **kwargs)
                seconds, cpu = time.perf_counter() - start, time.process_time() - start_cpu
                if round_:  # the first round warms up
                    best[name] = min(best[name], seconds)
                    best_cpu[name] = min(best_cpu[name], cpu)
                outputs[name] = out[0, -tokens:].tolist()
    SharedGEMM.__call__ = rows_call
    return {
        "tokens_per_s": {name: tokens / s for name, s in best.items()},
        "tokens_per_cpu_s": {name: tokens / s for name, s in best_cpu.items()},
        "same_tokens": outputs["rows"] == outputs["shared"],
    }


def ops(hidden: int, kv: int, tokens: int, repeats: int, threads: int) -> dict:
    """One q/k/v projection step in isolation: the fused GEMM + split against three row GEMMs (best of N)."""
    import time

    import torch
    import torch.nn.functional as F

    torch.set_num_threads(threads)
    weight = torch.randn(hidden + 2 * kv, hidden)
    sizes = [hidden, kv, kv]
    bounds = [(0, hidden), (hidden, hidden + kv), (hidden + kv, hidden + 2 * kv)]
    x = torch.randn(1, tokens, hidden)

    def shared():
        return F.linear(x, weight).split(sizes, dim=-1)

    def rows():
        return [F.linear(x, weight[a:b]) for a, b in bounds]

    best = {"shared": float("inf"), "rows": float("inf")}
    with torch.inference_mode():
        for _ in range(repeats):
            for name, run in (("shared", shared), ("rows", rows)):
                start = time.perf_counter()
                for _ in range(20):
                    run()
                best[name] = min(best[name], (time.perf_counter() - start) / 20)
    return {name: seconds * 1e6 for name, seconds in best.items()}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--workdir", default="bench-out")
    parser.add_argument("--size", choices=sorted(SIZES), default="small")
    parser.add_argument("--tokens", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--mode", choices=["no_grad", "inference_mode"], default="inference_mode")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (1: CPU time measures work, even on a busy machine)",
    )
    args = parser.parse_args()
    path = llama_checkpoint(args.workdir, SIZES[args.size], max_shard_size="200MB")
    result = measure(
        "bench_shared_gemm:decode",
        path=str(path),
        tokens=args.tokens,
        rounds=args.rounds,
        mode=args.mode,
        threads=args.threads,
    ).result
    rates = result["tokens_per_s"]
    cpu = result["tokens_per_cpu_s"]
    print(
        f"checkpoint: {path}; {args.tokens} tokens per round, best of {args.rounds} rounds, {args.mode}, "
        f"{args.threads} thread(s)"
    )
    for name, rate in rates.items():
        print(f"  {name:8s} {rate:8.1f} tokens/s wall, {cpu[name]:8.1f} tokens per CPU second")
    print(
        f"shared / rows: {rates['shared'] / rates['rows']:.3f}x wall, {cpu['shared'] / cpu['rows']:.3f}x CPU  "
        f"({'same tokens' if result['same_tokens'] else 'DIFFERENT TOKENS'})"
    )
    shape = SIZES[args.size]
    kv = shape.hidden_size // shape.num_attention_heads * shape.num_key_value_heads
    for tokens in (1, 128):
        micro = measure(
            "bench_shared_gemm:ops",
            hidden=shape.hidden_size,
            kv=kv,
            tokens=tokens,
            repeats=200,
            threads=args.threads,
        ).result
        print(
            f"  q/k/v step alone, {tokens:3d} token(s): fused GEMM + split {micro['shared']:7.1f} us, "
            f"three row GEMMs {micro['rows']:7.1f} us (best of 200)"
        )


if __name__ == "__main__":
    main()
