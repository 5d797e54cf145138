"""Shared benchmark helpers: measuring a function in a fresh process, and generating checkpoints.

``measure("bench_convert:copy_with_safetensors", src=..., dst=...)`` runs the function in a new Python
process, so that imports, allocator state and freed memory of one variant do not leak into another. It
returns the wall time, timed inside the child around the call alone, and the child's peak RSS during
the call: the child resets its high-water mark (``/proc/self/clear_refs``) just before the call and
reads ``VmHWM`` just after. (``ru_maxrss`` from ``wait4`` would not do: a child started with
fork/exec inherits the parent's high-water mark at exec, so every child would report at least the
parent's size.) ``baseline_rss`` is the child's resident size just before the call: the interpreter
and the function's module imports.

``interleaved(repeats, variants)`` runs every variant once per round, round after round and in a
different order each round, so that noise from other processes on the machine and the after-effects of
one variant on the next (page-cache reclaim, file-system write-back) spread over all variants.

``llama_checkpoint(workdir, ...)`` writes (once; later calls reuse it) a Llama-shaped safetensors
checkpoint with transformers' key names, random weights from a fixed seed, a ``config.json``, and
transformers' shard split and index.
"""

from __future__ import annotations

import json
import math
import os
import random
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parent

_CHILD = """
import importlib, json, re, sys, time
sys.path.insert(0, {benchmarks!r})
module, name = sys.argv[1].split(":")
function = getattr(importlib.import_module(module), name)
kwargs = json.loads(sys.argv[2])

def status(field):
    with open("/proc/self/status") as f:
        return int(re.search(field + r":\\s+(\\d+) kB", f.read()).group(1)) * 1024

with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # reset VmHWM to the current RSS
baseline = status("VmRSS")
start = time.perf_counter()
result = function(**kwargs)
seconds = time.perf_counter() - start
peak = status("VmHWM")
print("\\n@@measure@@" + json.dumps({{"seconds": seconds, "peak_rss": peak, "baseline_rss": baseline, "result": result}}))
"""


@dataclass(frozen=True)
class Measurement:
    seconds: float
    peak_rss: int
    """Bytes: the child's largest resident set size during the call (counting what it held before)."""
    baseline_rss: int
    """Bytes: the child's resident set size just before the call (interpreter and imports)."""
    result: object = None

    @property
    def added_rss(self) -> int:
        return self.peak_rss - self.baseline_rss


def measure(target: str, /, *, env: dict[str, str] | None = None, **kwargs: object) -> Measurement:
    """Run ``module:function(**kwargs)`` (a module in ``benchmarks/``; JSON-able kwargs) in a fresh process."""
    done = subprocess.run(
        [sys.executable, "-c", _CHILD.format(benchmarks=str(BENCHMARKS)), target, json.dumps(kwargs)],
        stdout=subprocess.PIPE,
        env={**os.environ, **(env or {})},
        text=True,
    )
    if done.returncode != 0 or "@@measure@@" not in done.stdout:
        raise RuntimeError(f"{target} failed with exit code {done.returncode}:\n{done.stdout[-2000:]}")
    report = json.loads(done.stdout.rsplit("@@measure@@", 1)[1])
    return Measurement(report["seconds"], report["peak_rss"], report["baseline_rss"], report["result"])


def interleaved(
    repeats: int, variants: dict[str, Callable[[], Measurement]], between: Callable[[], None] = lambda: None
) -> dict[str, list[Measurement]]:
    """Every variant once per round, in a shuffled (seeded) order, calling ``between`` after each run."""
    runs: dict[str, list[Measurement]] = {name: [] for name in variants}
    order = list(variants)
    shuffle = random.Random(0).shuffle
    for round_ in range(repeats):
        if round_:  # the first round keeps the given order; later ones spread order effects around
            shuffle(order)
        for name in order:
            runs[name].append(variants[name]())
            between()
    return runs


def median_of(
    repeats: int, run: Callable[[], Measurement], between: Callable[[], None] = lambda: None
) -> tuple[Measurement, list[Measurement]]:
    """Run one variant ``repeats`` times in a row (calling ``between`` after each): its median run, and all runs."""
    runs = interleaved(repeats, {"run": run}, between)["run"]
    return median(runs), runs


def median(runs: list[Measurement]) -> Measurement:
    """The run with the median time (the lower middle one for an even count)."""
    return sorted(runs, key=lambda m: m.seconds)[(len(runs) - 1) // 2]


def warm_page_cache(folder: str | os.PathLike) -> int:
    """Read every file under ``folder`` once so that later reads come from the page cache; returns bytes."""
    total = 0
    for path in sorted(Path(folder).rglob("*")):
        if path.is_file():
            with open(path, "rb", buffering=0) as f:
                while chunk := f.read(64 << 20):
                    total += len(chunk)
    return total


def tree_size(folder: str | os.PathLike) -> int:
    return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file())


def human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    raise AssertionError


# ------------------------------------------------------------------------------------------ checkpoints


@dataclass(frozen=True)
class LlamaShape:
    hidden_size: int = 1024
    intermediate_size: int = 2688
    num_hidden_layers: int = 24
    num_attention_heads: int = 16
    num_key_value_heads: int = 8
    vocab_size: int = 32000
    tie_word_embeddings: bool = False

    def tensors(self) -> Iterator[tuple[str, tuple[int, ...]]]:
        """Names and shapes in the order a transformers ``LlamaForCausalLM`` state dict has them."""
        h, i = self.hidden_size, self.intermediate_size
        kv = self.num_key_value_heads * (h // self.num_attention_heads)
        yield "model.embed_tokens.weight", (self.vocab_size, h)
        for n in range(self.num_hidden_layers):
            p = f"model.layers.{n}."
            yield p + "self_attn.q_proj.weight", (h, h)
            yield p + "self_attn.k_proj.weight", (kv, h)
            yield p + "self_attn.v_proj.weight", (kv, h)
            yield p + "self_attn.o_proj.weight", (h, h)
            yield p + "mlp.gate_proj.weight", (i, h)
            yield p + "mlp.up_proj.weight", (i, h)
            yield p + "mlp.down_proj.weight", (h, i)
            yield p + "input_layernorm.weight", (h,)
            yield p + "post_attention_layernorm.weight", (h,)
        yield "model.norm.weight", (h,)
        if not self.tie_word_embeddings:
            yield "lm_head.weight", (self.vocab_size, h)

    @property
    def parameters(self) -> int:
        return sum(math.prod(shape) for _, shape in self.tensors())

    def config(self) -> dict:
        return {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "torch_dtype": "float32",
            "head_dim": self.hidden_size // self.num_attention_heads,
            **self.__dict__,
        }


def llama_checkpoint(
    workdir: str | os.PathLike,
    shape: LlamaShape = LlamaShape(),
    *,
    max_shard_size: str = "500MB",
    seed: int = 0,
) -> Path:
    """A float32 checkpoint of ``shape`` under ``workdir``, written once and reused while its parameters match."""
    import torch

    from splice.checkpoint import CheckpointWriter
    from splice.transforms import TensorMeta

    folder = Path(workdir) / f"llama-{shape.parameters / 1e6:.0f}M-{max_shard_size}-seed{seed}"
    stamp = folder / ".complete"
    wanted = json.dumps({"shape": shape.__dict__, "max_shard_size": max_shard_size, "seed": seed})
    if stamp.is_file() and stamp.read_text() == wanted:
        return folder
    metas = {name: TensorMeta(shape_, torch.float32) for name, shape_ in shape.tensors()}
    generator = torch.Generator().manual_seed(seed)
    with CheckpointWriter(
        folder, metas, max_shard_size=max_shard_size, index_metadata={"total_parameters": shape.parameters}
    ) as writer:
        for name, meta in metas.items():
            writer.write(name, torch.randn(meta.shape, generator=generator).mul_(0.02))
        (writer.staging_dir / "config.json").write_text(json.dumps(shape.config(), indent=2) + "\n")
        (writer.staging_dir / ".complete").write_text(wanted)
    return folder


def summarize(runs: list[Measurement]) -> str:
    """Every run's time in the order run, to show how noisy the median is."""
    return " ".join(f"{m.seconds:.2f}" for m in runs)
