"""FSDP2 + DCP on a fused Llama (gloo on CPU, 2 ranks): loading and exporting, side by side in one run.

    .venv/bin/python benchmarks/bench_fsdp.py [--workdir ./bench-out] [--layers 24] [--world 2] [--repeat 1]

The checkpoint is ``_common.llama_checkpoint`` (float32; ``--layers 24`` is the ~340M model, fewer layers
make it smaller when the machine is shared). Every variant runs in fresh processes, one per rank.

Load (per rank: peak RSS, RSS above the process baseline, bytes DCP reads, seconds):

- **fused view**: meta device -> ``splice.fuse`` -> ``fully_shard`` -> ``to_empty`` ->
  ``dcp.load(splice.original_state_dict(model), HuggingFaceStorageReader)``;
- **unfused dcp** (the anchor): the same recipe unfused, ``dcp.load(model.state_dict(), ...)``;
- **from_pretrained**: ``splice.from_pretrained`` (whole model on every rank), then ``fully_shard``.

Bytes read are what DCP plans to read (the local chunks of the state dict it loads: each read item is one);
``from_pretrained`` reads the whole checkpoint. Targets: fused bytes read per rank <= 0.55 of the checkpoint,
RSS <= 1.1x the unfused DCP path.

Export (seconds, the slowest rank): ``splice.save_pretrained`` under FSDP2 (gather, rank 0 writes) and the
HF writer through splice's view (every rank writes its rows, rank 0 consolidates), against the HF writer on
the unfused model's own state dict. Target: <= 1.2x the unfused DCP export.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import LlamaShape, human, llama_checkpoint, tree_size, warm_page_cache  # noqa: E402

FUSION = {"qkv": True, "gate_up": True}
VARIANTS = ("fused_view", "unfused_dcp", "from_pretrained")

_RANK = """
import json, sys
sys.path.insert(0, {benchmarks!r})
import bench_fsdp
print("\\n@@rank@@" + json.dumps(bench_fsdp.rank_main(*sys.argv[1:])))
"""


def _current_rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _local_bytes(state_dict: dict) -> int:
    from splice.parallel.view import RowPieces

    total = 0
    for tensor in state_dict.values():
        local = tensor.to_local() if hasattr(tensor, "to_local") else tensor
        total += local.nbytes_local if isinstance(local, RowPieces) else local.numel() * local.element_size()
    return total


def _sharded_model(path: str, fusion: dict | None):
    import torch
    import transformers
    from torch.distributed.fsdp import fully_shard

    import splice

    config = transformers.AutoConfig.from_pretrained(path)
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config)
    if fusion:
        splice.fuse(model, fusion)
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    model.to_empty(device="cpu")
    for module in model.modules():
        if hasattr(module, "original_inv_freq"):
            model._init_weights(module)
    return model


def rank_main(variant: str, path: str, out: str) -> dict:
    """One rank of one variant: load, then (for the DCP variants) export."""
    import torch  # noqa: F401
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    import transformers.models.llama.modeling_llama  # noqa: F401

    import splice
    import splice.hf  # noqa: F401
    import splice.parallel.fsdp  # noqa: F401
    import splice.parallel.view  # noqa: F401

    dist.init_process_group("gloo")
    baseline = _current_rss()
    dist.barrier()
    started = time.perf_counter()
    if variant == "from_pretrained":
        from torch.distributed.fsdp import fully_shard
        from transformers import AutoModelForCausalLM

        model = splice.from_pretrained(AutoModelForCausalLM, path, fusion_config=FUSION)
        for layer in model.model.layers:
            fully_shard(layer)
        fully_shard(model)
        read = sum(p.stat().st_size for p in Path(path).glob("*.safetensors"))
    else:
        fused = variant == "fused_view"
        model = _sharded_model(path, FUSION if fused else None)
        target = splice.original_state_dict(model) if fused else model.state_dict()
        read = _local_bytes(target)
        dcp.load(target, storage_reader=dcp.HuggingFaceStorageReader(path))
    dist.barrier()
    seconds = time.perf_counter() - started
    result = {"seconds": seconds, "baseline_rss": baseline, "loaded_rss": _peak_rss(), "bytes_read": read}
    if variant != "from_pretrained":
        exports = {}
        if variant == "fused_view":
            dist.barrier()
            started = time.perf_counter()
            splice.save_pretrained(model, Path(out) / "save_pretrained")
            dist.barrier()
            exports["save_pretrained"] = time.perf_counter() - started
        dist.barrier()
        started = time.perf_counter()
        state = splice.original_state_dict(model) if variant == "fused_view" else model.state_dict()
        dcp.save(
            state,
            storage_writer=dcp.HuggingFaceStorageWriter(
                str(Path(out) / f"hf-writer-{variant}"), save_distributed=True, enable_consolidation=True
            ),
        )
        dist.barrier()
        exports["hf_writer"] = time.perf_counter() - started
        result["exports"] = exports
    dist.destroy_process_group()
    return result


def run_ranks(variant: str, path: Path, out: Path, world: int) -> list[dict]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    children = []
    for rank in range(world):
        env = {
            **os.environ,
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "WORLD_SIZE": str(world),
            "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // world)),
        }
        code = _RANK.format(benchmarks=str(Path(__file__).resolve().parent))
        children.append(
            subprocess.Popen(
                [sys.executable, "-c", code, variant, str(path), str(out)],
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
            raise RuntimeError(f"{variant} rank {rank} failed:\n{output[-2000:]}")
        report = json.loads(output.rsplit("@@rank@@", 1)[1])
        report["peak_rss"] = usage.ru_maxrss * 1024
        results.append(report)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--workdir", default="bench-out")
    parser.add_argument("--layers", type=int, default=24, help="decoder layers (24: ~340M parameters)")
    parser.add_argument("--world", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=1, help="runs per variant (median, min-max reported)")
    args = parser.parse_args()
    workdir = Path(args.workdir).resolve()
    shape = LlamaShape(num_hidden_layers=args.layers)
    path = llama_checkpoint(workdir, shape)
    weights = sum(p.stat().st_size for p in path.glob("*.safetensors"))
    print(
        f"checkpoint: {shape.parameters / 1e6:.0f}M parameters, fp32, {human(tree_size(path))}; world {args.world}"
    )
    warm_page_cache(path)

    runs: dict[str, list[list[dict]]] = {v: [] for v in VARIANTS}
    for _ in range(args.repeat):  # interleaved, so load on the shared machine hits every variant alike
        for variant in VARIANTS:
            out = workdir / "fsdp-out"
            shutil.rmtree(out, ignore_errors=True)
            runs[variant].append(run_ranks(variant, path, out, args.world))

    def stat(variant: str, pick) -> tuple[float, float, float]:
        values = [max(pick(r) for r in ranks) for ranks in runs[variant]]  # the worst rank of each run
        return statistics.median(values), min(values), max(values)

    print("\nload (worst rank; median [min-max] over runs):")
    anchor_rss = stat("unfused_dcp", lambda r: r["loaded_rss"])[0]
    anchor_added = stat("unfused_dcp", lambda r: r["loaded_rss"] - r["baseline_rss"])[0]
    for variant in VARIANTS:
        rss, lo, hi = stat(variant, lambda r: r["loaded_rss"])  # the peak up to the end of loading
        added = stat(variant, lambda r: r["loaded_rss"] - r["baseline_rss"])[0]
        read = stat(variant, lambda r: r["bytes_read"])[0]
        seconds = stat(variant, lambda r: r["seconds"])
        print(
            f"  {variant:16s} peak RSS {human(rss)} [{human(lo)}-{human(hi)}] = {rss / anchor_rss:.2f}x unfused dcp; "
            f"above baseline {human(added)} = {added / anchor_added:.2f}x; "
            f"read {human(read)} = {read / weights:.3f} of the checkpoint; "
            f"{seconds[0]:.2f} s [{seconds[1]:.2f}-{seconds[2]:.2f}]"
        )
    print("\nexport (worst rank; median [min-max]):")
    anchor = stat("unfused_dcp", lambda r: r["exports"]["hf_writer"])[0]
    for variant, name in (
        ("fused_view", "save_pretrained"),
        ("fused_view", "hf_writer"),
        ("unfused_dcp", "hf_writer"),
    ):
        seconds = stat(variant, lambda r, name=name: r["exports"][name])
        print(
            f"  {name:16s} ({variant}) {seconds[0]:.2f} s [{seconds[1]:.2f}-{seconds[2]:.2f}] "
            f"= {seconds[0] / anchor:.2f}x the unfused HF writer"
        )
    for variant in ("fused_view", "unfused_dcp"):
        print(
            f"  process peak RSS with its exports ({variant}): {human(stat(variant, lambda r: r['peak_rss'])[0])}"
        )


if __name__ == "__main__":
    main()
