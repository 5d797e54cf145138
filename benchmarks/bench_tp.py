"""Tensor-parallel loading (tp=2, gloo on CPU): against transformers' own TP, and against one process.

    .venv/bin/python benchmarks/bench_tp.py [--workdir ./bench-out] [--tp 2] [--repeats 3] [--compare-only]
    .venv/bin/python benchmarks/bench_tp.py [--workdir ./bench-out] [--tp 2] --model mixtral [--ep]

On the ~340M-parameter float32 Llama checkpoint of ``_common.llama_checkpoint`` (3 shards, 1.34 GB).

**splice vs transformers' TP.** ``--repeats`` rounds, each running both variants (in a shuffled order
after the first round), each on ``--tp`` freshly spawned ranks (gloo, CPU), from a warm page cache:

- **hf**: ``AutoModelForCausalLM.from_pretrained(path, tp_plan="auto")``, the plain layout;
- **splice**: ``splice.from_pretrained(AutoModelForCausalLM, path, fusion_config={"qkv": True,
  "gate_up": True}, tp_plan="auto")``.

Per variant, best of the rounds and the spread (min-max) of: load time, first forward (batch 1, 32
tokens), their sum (the slowest rank's in each round), the same in CPU seconds of the rank (user +
system: on a busy machine, wall time mostly measures the other processes), per-rank peak RSS (``VmHWM``, reset after the
process group starts, so it is the load and forward on top of interpreter + imports + process group),
bytes read with read system calls (``rchar``) and the number of those calls (``syscr``) from
``/proc/self/io``, and page faults (minor; transformers maps the files, so its reads are faults). The
ratios are splice / hf (best over best). Then splice's own count of the bytes each rank read and
mapped, and the physical limit: the bytes a rank must hold (its parameters) over the page-cache copy
speed measured here with ``--tp`` readers at once (into memory already faulted in; fresh memory costs
more, and mapped pages cost less, than that copy).

**splice TP vs one process**, fused ``qkv`` + ``gate_up``, each variant in fresh processes (skipped
with ``--compare-only``):

- **single**: ``splice.from_pretrained`` in one process;
- **tp**: ``splice.from_pretrained(..., tp_plan="auto")`` on ``--tp`` ranks at once.

Reported per process: peak RSS after loading and after a first forward (batch 1, 32 tokens; the
single-process loader memory-maps the tensors it only renames, so its pages arrive on first use),
both absolute and above the process's own baseline (interpreter + imports + process group), and the
checkpoint bytes each rank read. Targets: per-rank RSS <= 0.6x single; bytes read per rank ~= 1/tp.

``--model mixtral`` does the same on a ~230M-parameter float32 Mixtral checkpoint (8 experts per layer,
one tensor per expert on disk, as on the Hub), fused ``qkv``: its experts are sharded the way
transformers' plan says (each rank reads its rows of every expert); add ``--ep`` for expert
parallelism (``DistributedConfig(ep_size=tp)``: each rank reads its own experts whole).

Then ``splice consolidate`` of the ranks' shards (written by ``splice.parallel.save_shards``) is timed
against a plain byte copy of the same checkpoint (``shutil.copyfile`` per file), both from a warm page
cache, and checked to be byte-identical to the source.
"""

from __future__ import annotations

import argparse
import filecmp
import json
import os
import random
import re
import resource
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import torch  # noqa: F401  (every variant pays the same imports, so the RSS baselines match)
import torch.distributed.tensor.parallel  # noqa: F401
import transformers.models.llama.modeling_llama  # noqa: F401

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import LlamaShape, human, llama_checkpoint, measure, tree_size, warm_page_cache  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402, F401

import splice.hf  # noqa: E402, F401
import splice.parallel.consolidate  # noqa: E402
import splice.parallel.load  # noqa: E402, F401
import splice.parallel.shards  # noqa: E402, F401

FUSIONS = {"llama": {"qkv": True, "gate_up": True}, "mixtral": {"qkv": True}}
MIXTRAL = dict(
    hidden_size=1024, intermediate_size=1536, num_hidden_layers=4, num_attention_heads=16, num_key_value_heads=8,
    num_local_experts=8, num_experts_per_tok=2, vocab_size=32000,
)  # fmt: skip


def mixtral_checkpoint(workdir: Path, seed: int = 0) -> Path:
    """A float32 Mixtral checkpoint with one tensor per expert and projection (the Hub's names), written once."""
    from splice.checkpoint import CheckpointWriter
    from splice.transforms import TensorMeta

    c = MIXTRAL
    h, i = c["hidden_size"], c["intermediate_size"]
    kv = c["num_key_value_heads"] * h // c["num_attention_heads"]
    shapes = {"model.embed_tokens.weight": (c["vocab_size"], h)}
    for n in range(c["num_hidden_layers"]):
        p = f"model.layers.{n}."
        shapes |= {p + "self_attn.q_proj.weight": (h, h), p + "self_attn.k_proj.weight": (kv, h),
                   p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.o_proj.weight": (h, h),
                   p + "block_sparse_moe.gate.weight": (c["num_local_experts"], h)}  # fmt: skip
        for e in range(c["num_local_experts"]):
            q = f"{p}block_sparse_moe.experts.{e}."
            shapes |= {q + "w1.weight": (i, h), q + "w2.weight": (h, i), q + "w3.weight": (i, h)}
        shapes |= {p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,)}
    shapes |= {"model.norm.weight": (h,), "lm_head.weight": (c["vocab_size"], h)}
    parameters = sum(torch.Size(s).numel() for s in shapes.values())
    folder = workdir / f"mixtral-{parameters / 1e6:.0f}M-seed{seed}"
    wanted = json.dumps({"config": c, "seed": seed})
    if (folder / ".complete").is_file() and (folder / ".complete").read_text() == wanted:
        return folder
    metas = {name: TensorMeta(shape, torch.float32) for name, shape in shapes.items()}
    generator = torch.Generator().manual_seed(seed)
    config = {"architectures": ["MixtralForCausalLM"], "model_type": "mixtral", "torch_dtype": "float32", **c}
    with CheckpointWriter(
        folder, metas, max_shard_size="300MB", index_metadata={"total_parameters": parameters}
    ) as writer:
        for name, meta in metas.items():
            writer.write(name, torch.randn(meta.shape, generator=generator).mul_(0.02))
        (writer.staging_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        (writer.staging_dir / ".complete").write_text(wanted)
    return folder


_RANK = """
import json, resource, sys
sys.path.insert(0, {benchmarks!r})
import bench_tp
print("\\n@@rank@@" + json.dumps(getattr(bench_tp, sys.argv[1])(*sys.argv[2:])))
"""


def _rss() -> int:
    """Peak RSS so far. (A child's starts at its parent's RSS when it forked; the peaks here are far above.)"""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _current_rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _forward(model) -> None:

    with torch.no_grad():
        model(torch.arange(3, 35).unsqueeze(0))


def single(path: str, model: str) -> dict:
    """Runs in a fresh process (``_common.measure``)."""
    baseline = _current_rss()
    started = time.perf_counter()
    model = splice.from_pretrained(AutoModelForCausalLM, path, fusion_config=FUSIONS[model])
    seconds = time.perf_counter() - started
    loaded = _rss()
    _forward(model)
    return {"seconds": seconds, "baseline_rss": baseline, "loaded_rss": loaded, "forward_rss": _rss()}


def tp_rank(path: str, shards: str, model: str, ep: str) -> dict:
    """One rank: load tensor-parallel (``ep`` "1": experts expert-parallel), one forward, then write its shard."""
    import torch.distributed as dist

    from splice.parallel import get_parallel_state, save_shards

    dist.init_process_group("gloo")
    baseline = _current_rss()
    dist.barrier()  # start every rank's clock together: the load's collectives would wait for a late starter
    started = time.perf_counter()
    if ep == "1":
        world = dist.get_world_size()
        request = {"distributed_config": {"tp_size": world, "ep_size": world}}
    else:
        request = {"tp_plan": "auto"}
    model = splice.from_pretrained(AutoModelForCausalLM, path, fusion_config=FUSIONS[model], **request)
    seconds = time.perf_counter() - started
    loaded = _rss()
    _forward(model)
    forward = _rss()
    parallel = get_parallel_state(model)
    save_shards(model, shards)
    dist.barrier()
    dist.destroy_process_group()
    return {
        "rank": int(os.environ["RANK"]),
        "seconds": seconds,
        "baseline_rss": baseline,
        "loaded_rss": loaded,
        "forward_rss": forward,
        "bytes_read": parallel.bytes_read,
        "sharded_bytes_read": parallel.sharded_bytes_read,
        "replicated_bytes_read": parallel.replicated_bytes_read,
    }


def run_tp(path: Path, shards: Path, tp: int, model: str = "llama", ep: bool = False) -> list[dict]:
    return spawn_ranks("tp_rank", tp, str(path), str(shards), model, "1" if ep else "0")


def spawn_ranks(function: str, tp: int, *args: str) -> list[dict]:
    """``bench_tp.<function>(*args)`` on ``tp`` fresh processes forming a gloo group; their reports, by rank."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    children = []
    for rank in range(tp):
        env = {
            **os.environ,
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "WORLD_SIZE": str(tp),
            "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // tp)),
        }
        code = _RANK.format(benchmarks=str(Path(__file__).resolve().parent))
        children.append(
            subprocess.Popen(
                [sys.executable, "-c", code, function, *args],
                stdout=subprocess.PIPE,
                text=True,
                env=env,
            )
        )
    results = []
    for rank, child in enumerate(children):
        output = child.stdout.read()
        child.stdout.close()
        _, status, usage = os.wait4(child.pid, 0)
        if os.waitstatus_to_exitcode(status) != 0 or "@@rank@@" not in output:
            raise RuntimeError(f"rank {rank} failed:\n{output[-2000:]}")
        report = json.loads(output.rsplit("@@rank@@", 1)[1])
        report["peak_rss"] = usage.ru_maxrss * 1024
        results.append(report)
    return results


# --------------------------------------------------------------------------------------------------
# splice's TP against transformers' TP


def _proc_io() -> dict[str, int]:
    with open("/proc/self/io") as f:
        return {k: int(v) for k, v in (line.split(":") for line in f)}


def _cpu() -> float:
    """This process's CPU seconds (user + system): what the work costs, whatever else runs on the machine."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        return int(re.search(field + r":\s+(\d+) kB", f.read()).group(1)) * 1024


def compare_rank(variant: str, path: str) -> dict:
    """One rank of one variant: load tensor-parallel, then one forward, measuring each."""
    import torch.distributed as dist

    dist.init_process_group("gloo")
    dist.barrier()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM := VmRSS: the peak below is this load's, on top of imports and the process group
    baseline = _status("VmRSS")
    dist.barrier()  # every rank's clock starts together: the load's collectives would wait for a late starter
    io, faults, cpu = _proc_io(), resource.getrusage(resource.RUSAGE_SELF).ru_minflt, _cpu()
    started = time.perf_counter()
    if variant == "hf":
        model = AutoModelForCausalLM.from_pretrained(path, tp_plan="auto")
    else:
        model = splice.from_pretrained(
            AutoModelForCausalLM, path, fusion_config=FUSIONS["llama"], tp_plan="auto"
        )
    loaded, load_cpu = time.perf_counter(), _cpu() - cpu
    after_io = _proc_io()
    load_faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
    cpu = _cpu()
    _forward(model)
    forwarded, forward_cpu = time.perf_counter(), _cpu() - cpu
    local_bytes = sum(
        (p.to_local() if hasattr(p, "to_local") else p).nbytes for p in model.parameters()
    )  # fmt: skip
    counters = {}
    if variant == "splice":
        from splice.parallel import get_parallel_state

        state = get_parallel_state(model)
        counters = {"mapped": state.bytes_mapped, "copied": state.bytes_read - state.bytes_mapped}
    dist.barrier()
    dist.destroy_process_group()
    return {
        "rank": int(os.environ["RANK"]),
        "load": loaded - started,
        "forward": forwarded - loaded,
        "load_cpu": load_cpu,
        "forward_cpu": forward_cpu,
        "baseline_rss": baseline,
        "peak_rss": _status("VmHWM"),
        "rchar": after_io["rchar"] - io["rchar"],
        "syscr": after_io["syscr"] - io["syscr"],
        "faults": load_faults,
        "local_bytes": local_bytes,
        **counters,
    }


def page_cache_speed(path: Path, tp: int) -> float:
    """Bytes per second one of ``tp`` concurrent readers copies out of the (warm) page cache into user memory."""
    files = [str(f) for f in sorted(path.glob("*.safetensors"))]
    code = (
        "import os, sys, time, torch\n"
        "from splice.checkpoint._io import memory_of\n"
        "keep = torch.ones(64 << 18); buf = memory_of(keep)\n"  # 64 MiB, faulted in before the clock
        "started, total = time.perf_counter(), 0\n"
        "for name in sys.argv[1:]:\n"
        "    fd = os.open(name, os.O_RDONLY)\n"
        "    while (n := os.preadv(fd, [buf], total)): total += n\n"
        "    total = 0; os.close(fd)\n"
        "print(time.perf_counter() - started)\n"
    )
    children = [
        subprocess.Popen([sys.executable, "-c", code, *files], stdout=subprocess.PIPE, text=True)
        for _ in range(tp)
    ]
    seconds = max(float(child.communicate()[0]) for child in children)
    return sum(os.path.getsize(f) for f in files) / seconds


def compare(path: Path, tp: int, repeats: int) -> None:
    runs: dict[str, list[list[dict]]] = {"hf": [], "splice": []}
    order = list(runs)
    for round_ in range(repeats):
        if round_:
            random.Random(round_).shuffle(order)
        for variant in order:
            runs[variant].append(spawn_ranks("compare_rank", tp, variant, str(path)))

    def stat(variant: str, value) -> tuple[float, float]:
        per_round = [value(ranks) for ranks in runs[variant]]
        return min(per_round), max(per_round)

    metrics = {
        "load (s, slowest rank)": lambda ranks: max(r["load"] for r in ranks),
        "first forward (s)": lambda ranks: max(r["forward"] for r in ranks),
        "load + forward (s)": lambda ranks: max(r["load"] + r["forward"] for r in ranks),
        "load CPU (s)": lambda ranks: max(r["load_cpu"] for r in ranks),
        "forward CPU (s)": lambda ranks: max(r["forward_cpu"] for r in ranks),
        "load + forward CPU (s)": lambda ranks: max(r["load_cpu"] + r["forward_cpu"] for r in ranks),
        "peak RSS per rank (GB)": lambda ranks: max(r["peak_rss"] - r["baseline_rss"] for r in ranks) / 1e9,
        "read() bytes per rank (GB)": lambda ranks: max(r["rchar"] for r in ranks) / 1e9,
        "read syscalls per rank": lambda ranks: max(r["syscr"] for r in ranks),
        "minor faults per rank": lambda ranks: max(r["faults"] for r in ranks),
    }
    print(f"\nsplice fused TP vs transformers' TP of the plain layout, world {tp}, gloo, best of {repeats}:")
    print(f"    {'':28} {'hf best':>10} {'(spread)':>17} {'splice best':>12} {'(spread)':>17} {'ratio':>6}")
    for name, value in metrics.items():
        h, s = stat("hf", value), stat("splice", value)
        ratio = s[0] / h[0] if h[0] else float("nan")
        fmt = (lambda x: f"{x:.0f}") if "syscalls" in name or "faults" in name else (lambda x: f"{x:.3f}")
        print(
            f"    {name:28} {fmt(h[0]):>10} {f'({fmt(h[0])}-{fmt(h[1])})':>17} "
            f"{fmt(s[0]):>12} {f'({fmt(s[0])}-{fmt(s[1])})':>17} {ratio:6.2f}"
        )
    ranks = runs["splice"][0]
    print(
        "    splice's reader per rank: "
        + ", ".join(
            f"{human(r['copied'])} read, {human(r['mapped'])} mapped (paged in on touch)" for r in ranks
        )
    )
    must = max(r["local_bytes"] for r in ranks)
    speed = max(page_cache_speed(path, tp) for _ in range(repeats))
    print(
        f"    physical limit: {human(must)} of parameters per rank / {human(speed)}/s page-cache copy per "
        f"rank ({tp} readers at once, best of {repeats}) = {must / speed:.3f} s"
    )


def copy_files(src: str, dst: str) -> None:
    out = Path(dst)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    for path in sorted(Path(src).iterdir()):
        if path.is_file():
            shutil.copyfile(path, out / path.name)


def read_write_files(src: str, dst: str) -> None:
    """Each file read into memory, written out and fsynced: the user-space floor of any rewrite."""
    out = Path(dst)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    for path in sorted(Path(src).iterdir()):
        if path.is_file():
            data = path.read_bytes()
            fd = os.open(out / path.name, os.O_CREAT | os.O_WRONLY | os.O_TRUNC)
            try:
                view, done = memoryview(data), 0
                while done < len(view):
                    done += os.pwrite(fd, view[done : done + (64 << 20)], done)
                os.fsync(fd)
            finally:
                os.close(fd)
            del data


def consolidate(shards: str, out: str) -> None:
    splice.parallel.consolidate.consolidate(shards, out, progress=False)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--workdir", default="bench-out")
    parser.add_argument("--tp", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--compare-only", action="store_true", help="only splice's TP vs transformers' TP")
    parser.add_argument("--model", choices=sorted(FUSIONS), default="llama")
    parser.add_argument("--ep", action="store_true", help="--model mixtral: experts expert-parallel")
    args = parser.parse_args()
    if args.ep and args.model != "mixtral":
        parser.error("--ep needs --model mixtral")
    workdir = Path(args.workdir).resolve()
    if args.model == "mixtral":
        path = mixtral_checkpoint(workdir)
        parameters = json.loads((path / "model.safetensors.index.json").read_text())["metadata"][
            "total_parameters"
        ]
    else:
        shape = LlamaShape()
        path, parameters = llama_checkpoint(workdir, shape), shape.parameters
    size = tree_size(path)
    files = sorted(p.name for p in path.glob("*.safetensors"))
    print(
        f"{args.model} checkpoint: {parameters / 1e6:.0f}M parameters, fp32, {len(files)} shards, {human(size)}"
    )
    warm_page_cache(path)
    if args.model == "llama":  # the side-by-side with transformers TP is the dense case
        compare(path, args.tp, args.repeats)
    if args.compare_only:
        return

    one = measure("bench_tp:single", path=str(path), model=args.model)
    name = f"{args.model}-{'ep' if args.ep else 'tp'}{args.tp}"
    shards = workdir / f"{name}-shards"
    ranks = run_tp(path, shards, args.tp, args.model, args.ep)
    single_base = one.result["baseline_rss"]
    single_load, single_forward = one.result["loaded_rss"], one.result["forward_rss"]

    print(f"\nsingle process: load {one.result['seconds']:.2f} s, baseline {human(single_base)}, "
          f"after load {human(single_load)}, after forward {human(single_forward)} (peak {human(one.peak_rss)})")  # fmt: skip
    weights = sum(p.stat().st_size for p in path.glob("*.safetensors"))
    for r in ranks:
        added = r["forward_rss"] - r["baseline_rss"]
        print(
            f"tp rank {r['rank']}: load {r['seconds']:.2f} s, baseline {human(r['baseline_rss'])}, "
            f"after load {human(r['loaded_rss'])}, after forward {human(r['forward_rss'])} "
            f"(peak {human(r['peak_rss'])}, {human(added)} above baseline)"
        )
        print(
            f"    RSS after forward vs single: {r['forward_rss'] / single_forward:.2f}x absolute, "
            f"{added / (single_forward - single_base):.2f}x above baseline; "
            f"read {human(r['bytes_read'])} = {r['bytes_read'] / weights:.3f} of the checkpoint "
            f"(sharded {human(r['sharded_bytes_read'])}, replicated {human(r['replicated_bytes_read'])})"
        )

    warm_page_cache(shards)
    out = workdir / f"{name}-consolidated"
    copy = measure("bench_tp:copy_files", src=str(path), dst=str(workdir / "plain-copy"))
    rewrite = measure("bench_tp:read_write_files", src=str(path), dst=str(workdir / "plain-rewrite"))
    cons = measure("bench_tp:consolidate", shards=str(shards), out=str(out))
    identical = all(
        filecmp.cmp(path / n, out / n, shallow=False) for n in files + ["model.safetensors.index.json"]
    )
    print(
        f"\nconsolidate {args.tp} shards -> {len(list(out.glob('*.safetensors')))} files: {cons.seconds:.2f} s "
        f"(peak RSS {human(cons.peak_rss)}), byte-identical to the source: {identical}\n"
        f"    vs byte copy of the checkpoint (shutil.copyfile): {copy.seconds:.2f} s -> {cons.seconds / copy.seconds:.2f}x\n"
        f"    vs read + write + fsync of its files: {rewrite.seconds:.2f} s -> {cons.seconds / rewrite.seconds:.2f}x"
    )


if __name__ == "__main__":
    main()
