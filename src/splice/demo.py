"""`splice demo`: the whole product on one small local model, with no network.

1. Build a Llama-style model (GQA, non-square MLP) and save it with transformers, in 3 shards.
2. Load it with plain transformers, and with splice straight into the fused layout (qkv + gate_up).
3. Check the logits and 20 greedy tokens match.
4. Time both: load + first forward, and batch-1 decoding with a KV cache.
5. Save the fused model back in the original layout and check the files are byte-identical.

Exits non-zero if any check fails.
"""

from __future__ import annotations

import argparse
import filecmp
import statistics
import tempfile
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from splice.errors import CheckpointError

FUSION = {"qkv": True, "gate_up": True}


def demo_config():
    from transformers import LlamaConfig

    return LlamaConfig(
        hidden_size=512,
        intermediate_size=1376,
        num_hidden_layers=8,
        num_attention_heads=8,
        num_key_value_heads=4,
        vocab_size=8192,
        max_position_embeddings=512,
        bos_token_id=1,
        eos_token_id=2,
    )


def _timed(fn, repeat: int) -> tuple[float, object]:
    times, result = [], None
    for _ in range(repeat):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def run(args: argparse.Namespace) -> int:
    import transformers

    import splice

    console = Console()
    workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="splice-demo-"))
    try:
        workdir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        reason = "it exists and is not a directory" if isinstance(exc, FileExistsError) else exc.strerror
        raise CheckpointError(f"--workdir {workdir}: cannot use it as a directory: {reason}") from None
    source, saved = workdir / "llama-demo", workdir / "saved-original-layout"
    torch.manual_seed(0)
    prompt = torch.randint(3, 8192, (1, 16))

    with console.status("building a Llama-style checkpoint with transformers..."):
        model = transformers.LlamaForCausalLM(demo_config())
        model.save_pretrained(source, max_shard_size="50MB")
        del model
    params = sum(p.numel for p in splice.checkpoint.CheckpointReader(source).metas().values())
    shards = len(list(source.glob("model-*.safetensors")))
    console.print(f"checkpoint: {source} ({params / 1e6:.1f}M parameters, fp32, {shards} shards)")

    def load_plain():
        m = transformers.AutoModelForCausalLM.from_pretrained(source)
        with torch.no_grad():
            return m, m(prompt).logits

    def load_fused():
        m = splice.from_pretrained(transformers.AutoModelForCausalLM, source, fusion_config=FUSION)
        with torch.no_grad():
            return m, m(prompt).logits

    with console.status("loading with transformers and with splice (load + first forward, 3 times each)..."):
        load_plain(), load_fused()  # warm the page cache and the allocator
        plain_time, (plain, plain_logits) = _timed(load_plain, args.repeat)
        fused_time, (fused, fused_logits) = _timed(load_fused, args.repeat)
    report = splice.fusion.get_state(fused)
    console.print(f"fused: {', '.join(f'{f} x{n}' for f, n in _counts(report).items())}")

    diff = (plain_logits - fused_logits).abs().max().item()
    kwargs = dict(max_new_tokens=20, min_new_tokens=20, do_sample=False)
    same_tokens = torch.equal(plain.generate(prompt, **kwargs), fused.generate(prompt, **kwargs))

    with console.status("timing batch-1 decoding with a KV cache..."):
        decode = dict(max_new_tokens=args.tokens, min_new_tokens=args.tokens, do_sample=False)
        plain_decode, _ = _timed(lambda: plain.generate(prompt, **decode), args.repeat)
        fused_decode, _ = _timed(lambda: fused.generate(prompt, **decode), args.repeat)

    with console.status("saving the fused model in the original layout..."):
        splice.save_pretrained(fused, saved)  # split like the source, file by file
    names = sorted(p.name for p in source.iterdir())
    identical = names == sorted(p.name for p in saved.iterdir()) and all(
        filecmp.cmp(source / n, saved / n, shallow=False) for n in names
    )

    table = Table(title="splice demo")
    table.add_column("check")
    table.add_column("result")
    table.add_column("ok")
    ok = {True: "[green]yes[/green]", False: "[red]NO[/red]"}
    checks = [
        ("max |logits - transformers logits|", f"{diff:.2e}", diff <= 1e-5),
        ("20 greedy tokens identical", str(same_tokens), same_tokens),
        ("saved files byte-identical to the source", f"{len(names)} files", identical),
    ]
    for name, value, good in checks:
        table.add_row(name, value, ok[good])
    table.add_row(
        "load + first forward: transformers / splice fused",
        f"{plain_time:.2f} s / {fused_time:.2f} s",
        f"{fused_time / plain_time:.2f}x",
    )
    rate_plain, rate_fused = args.tokens / plain_decode, args.tokens / fused_decode
    table.add_row(
        "decode tokens/s: unfused / fused",
        f"{rate_plain:.1f} / {rate_fused:.1f}",
        f"{rate_fused / rate_plain:.2f}x",
    )
    console.print(table)
    console.print(f"files are in {workdir}")
    return 0 if all(good for _, _, good in checks) else 1


def _counts(state) -> dict[str, int]:
    counts: dict[str, int] = {}
    for record in state.records:
        counts[record.family] = counts.get(record.family, 0) + 1
    return counts
