"""Decoding, prefill and a training step: unfused transformers vs splice fused, side by side in one process.

    python benchmarks/bench_decode.py [--workdir bench-out] [--size small|340m] [--tokens 64] [--repeats 5]
                                      [--device cpu|cuda] [--threads N] [--skip-compile]

Every variant is built from the same checkpoint and timed in the same process, round after round in a
shuffled order (interleaved: noise from other processes spreads over all of them). Each row prints the
best and the median of the rounds, the spread (max/min - 1), and the ratio of bests to the unfused model.

Variants:
- ``unfused``: transformers as it loads.
- ``fused slices``: splice's qkv + gate_up layout, the modules' own forwards reaching the fused GEMM
  through the pass-through slices (what fusion did before fused forwards).
- ``fused``: the same layout with fused forwards (one qkv_proj call, one gate_up_proj call per layer).
- ``fused+column-major``: fused, with the fused projections' weights stored column-major
  (`splice.kernels.use_column_major`): MKL's matrix-vector product reads them about twice as fast.
- ``fused+column-major+kernels``: also norm + attention and norm + MLP chains with the
  rms_norm_attention and rms_norm_gated_mlp kernels (`splice.kernels`).
- ``unfused+column-major``: the unfused model with q/k/v/gate/up stored column-major: how much of the
  gain is the layout alone, without fusion.

Sections: batch-1 greedy decoding with a KV cache (tokens/s, aten ops and GEMMs per step, tokens
checked identical), batch-8 prefill (tokens/s), one training step (forward + backward + SGD on batch 4),
and ``torch.compile`` of the whole model, unfused vs fused (+kernels). ``--device cuda`` runs on a GPU
(timings synchronized), and adds the compiled rows with ``mode="reduce-overhead"`` (CUDA graphs) and a
static cache. Targets (CPU, eager, batch 1): fused decode >= 1.10x unfused tokens/s, ops per step <= 0.7x.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import LlamaShape, llama_checkpoint  # noqa: E402

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
from splice.demo import VARIANTS  # noqa: E402

EAGER = (*VARIANTS[:1], "fused slices", *VARIANTS[1:])


def build(path: Path, variant: str, device: str):
    import torch

    from splice.demo import build_variant
    from splice.fusion import forwards

    model = build_variant("fused" if variant == "fused slices" else variant, path)
    if variant == "fused slices":
        for module in model.modules():
            if forwards.installed(module):
                forwards.remove(module, module.forward)
    return model.to(device).eval().requires_grad_(False), torch


def synchronize(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


CLOCK = time.perf_counter  # --clock cpu: time.process_time


def interleave(repeats: int, runs: dict, device: str) -> dict[str, list[float]]:
    """Seconds per run of every variant, one run each per round, in a shuffled order after the first round."""
    times: dict[str, list[float]] = {name: [] for name in runs}
    order = list(runs)
    for round_ in range(repeats):
        if round_:
            random.Random(round_).shuffle(order)
        for name in order:
            synchronize(device)
            start = CLOCK()
            runs[name]()
            synchronize(device)
            times[name].append(CLOCK() - start)
    return times


def report(
    title: str, times: dict[str, list[float]], work: float, unit: str, higher_is_better: bool = True
) -> None:
    print(f"\n{title}")
    base = min(times["unfused"]) if "unfused" in times else None
    for name, seconds in times.items():
        best, median = min(seconds), statistics.median(seconds)
        spread = max(seconds) / best - 1
        if higher_is_better:
            line = (
                f"  {name:26s} {work / best:9.1f} {unit} (median {work / median:.1f}, spread {spread:4.0%})"
            )
        else:
            line = (
                f"  {name:26s} {best * 1e3:9.1f} ms/{unit} (median {median * 1e3:.1f}, spread {spread:4.0%})"
            )
        if base is not None:
            line += f"  {base / best:5.2f}x unfused"
        print(line)


def python_calls(model, *args, **kwargs) -> int:
    """Python function calls (and builtins called from Python) in one call: the interpreter's share of a step."""
    calls = 0

    def profile(frame, event, arg):
        nonlocal calls
        calls += event in ("call", "c_call")

    sys.setprofile(profile)
    try:
        model(*args, **kwargs)
    finally:
        sys.setprofile(None)
    return calls


def read_bandwidth(megabytes: int = 512, repeats: int = 5) -> float:
    """Bytes per second this process's torch threads read from memory (best of ``repeats``)."""
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
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    parser.add_argument("--skip-compile", action="store_true")
    parser.add_argument(
        "--clock",
        choices=("wall", "cpu"),
        default="wall",
        help="cpu: this process's CPU time (with --threads 1, excludes waiting for other processes on a busy machine)",
    )
    args = parser.parse_args()
    global CLOCK
    CLOCK = time.process_time if args.clock == "cpu" else time.perf_counter

    import torch

    from splice.demo import count_ops

    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: no CUDA device is available here")
    if args.threads:
        torch.set_num_threads(args.threads)
    shape = SIZES[args.size]
    path = llama_checkpoint(args.workdir, shape, max_shard_size="200MB")
    print(
        f"checkpoint: {path} ({shape.parameters / 1e6:.0f}M parameters, fp32) on {args.device}"
        f" ({torch.get_num_threads()} threads); best of {args.repeats} interleaved rounds, {args.clock} clock"
    )
    models = {name: build(path, name, args.device)[0] for name in EAGER}
    device = args.device
    prompt = torch.arange(3, 19, device=device).unsqueeze(0)
    greedy = dict(max_new_tokens=args.tokens, min_new_tokens=args.tokens, do_sample=False)

    # -- batch-1 decoding -------------------------------------------------------------------------
    with torch.inference_mode():
        tokens = {n: m.generate(prompt, **greedy)[0, -args.tokens :].tolist() for n, m in models.items()}
        ops = {}
        for name, model in models.items():
            out = model(prompt)
            step = out.logits[:, -1:].argmax(-1)
            ops[name] = count_ops(model, step, past_key_values=out.past_key_values)
            out = model(prompt)
            ops[name] += (python_calls(model, step, past_key_values=out.past_key_values),)
        decode = interleave(
            args.repeats, {n: lambda m=m: m.generate(prompt, **greedy) for n, m in models.items()}, device
        )
    report(f"decode, batch 1, {args.tokens} tokens, eager", decode, args.tokens, "tokens/s")
    for name in models:
        same = "same tokens" if tokens[name] == tokens["unfused"] else "DIFFERENT TOKENS"
        n_ops, n_gemm, n_calls = ops[name]
        print(
            f"  {name:26s} {n_ops:5d} aten ops/step ({n_ops / ops['unfused'][0]:.2f}x), {n_gemm} GEMMs, "
            f"{n_calls} Python calls/step ({n_calls / ops['unfused'][2]:.2f}x), {same}"
        )
    if device == "cpu":
        bandwidth = read_bandwidth()
        weight_bytes = 4 * (
            shape.parameters - shape.vocab_size * shape.hidden_size
        )  # embedding: a row lookup
        ceiling = bandwidth / weight_bytes
        best = max(args.tokens / min(t) for t in decode.values())
        print(
            f"  memory-bandwidth ceiling {ceiling:.1f} tokens/s ({bandwidth / 1e9:.1f} GB/s read now, "
            f"{weight_bytes / 1e6:.0f} MB of weights per token); best variant at {best / ceiling:.0%} of it"
        )

    # -- batch-8 prefill ----------------------------------------------------------------------------
    batch = torch.randint(3, shape.vocab_size, (8, 128), generator=torch.Generator().manual_seed(0)).to(
        device
    )
    with torch.inference_mode():
        prefill = interleave(
            args.repeats, {n: lambda m=m: m(batch, use_cache=False) for n, m in models.items()}, device
        )
    report("prefill, batch 8 x 128 tokens", prefill, batch.numel(), "tokens/s")

    # -- one training step --------------------------------------------------------------------------
    train = torch.randint(3, shape.vocab_size, (4, 64), generator=torch.Generator().manual_seed(1)).to(device)
    steps = {}
    for name in VARIANTS:
        model = models[name].train().requires_grad_(True)
        optimizer = torch.optim.SGD(
            model.parameters(), lr=0.0
        )  # lr 0: the weights stay the same for later rows

        def step(model=model, optimizer=optimizer):
            model(train, labels=train).loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        step()
        steps[name] = step
    report(
        "training step, batch 4 x 64 tokens (forward + backward + SGD)",
        interleave(args.repeats, steps, device),
        1,
        "step",
        False,
    )
    for model in models.values():
        model.eval().requires_grad_(False)

    # -- torch.compile ------------------------------------------------------------------------------
    if args.skip_compile:
        return
    modes = [("default", None)] + ([("reduce-overhead", "static")] if device == "cuda" else [])
    for mode, cache in modes:
        compiled = {}
        kwargs = dict(greedy, **({"cache_implementation": cache} if cache else {}))
        for name in VARIANTS:
            model = build(path, name, device)[0]
            model.forward = torch.compile(
                model.forward, mode=None if mode == "default" else mode, dynamic=cache is None
            )
            try:
                with torch.inference_mode():
                    model.generate(prompt, **kwargs)  # compile
                    same = model.generate(prompt, **kwargs)[0, -args.tokens :].tolist() == tokens["unfused"]
            except Exception as exc:  # noqa: BLE001 - a benchmark row that cannot run says why and moves on
                print(f"  compiled {name} ({mode}) did not run: {str(exc).splitlines()[0][:160]}")
                continue
            if not same:
                print(f"  compiled {name} ({mode}): DIFFERENT TOKENS")
            compiled[name] = lambda m=model, kw=kwargs: m.generate(prompt, **kw)
        if "unfused" in compiled:
            with torch.inference_mode():
                times = interleave(args.repeats, compiled, device)
            report(f"decode, batch 1, torch.compile(mode={mode!r})", times, args.tokens, "tokens/s")
            eager_best = min(decode["unfused"])
            print(f"  (unfused eager: {args.tokens / eager_best:.1f} tokens/s)")

    speedups = ", ".join(f"{n} {min(decode['unfused']) / min(decode[n]):.2f}x" for n in VARIANTS[1:])
    op_ratios = ", ".join(f"{n} {ops[n][0] / ops['unfused'][0]:.2f}x" for n in VARIANTS[1:])
    layout = min(decode["unfused+column-major"]) / min(decode["fused+column-major"])
    print(
        f"\ntargets: decode >= 1.10x unfused: {speedups}\n"
        f"         ops/step <= 0.7x: {op_ratios}\n"
        f"  fusion's own share: fused+column-major / unfused+column-major = {layout:.2f}x"
    )


if __name__ == "__main__":
    main()
