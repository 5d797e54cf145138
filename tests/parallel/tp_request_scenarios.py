"""What each rank does in the tests of the TP request (`test_tp_requests.py`): every way transformers
5.23 accepts to ask for tensor parallelism, the conflicts it refuses, and greedy ``generate`` with a
static KV cache.

The ranks load the same tiny Llama once per request and return the logits, the TP size they got and
the tokens; the parent compares them with the single-process model.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import ranks
import torch

PRELOAD = [
    "torch",
    "torch.distributed.tensor.parallel",
    "transformers",
    "transformers.models.llama.modeling_llama",
    "splice.hf",
    "splice.parallel.load",
]
FUSION = {"qkv": True, "gate_up": True}
NEW_TOKENS = 10


def spawn(scenario: str, world: int, workdir: Path, **options: Any) -> list[dict[str, Any]]:
    """Run ``scenario`` on ``world`` ranks (gloo, CPU); returns each rank's results."""
    return ranks.spawn(sys.modules[__name__], scenario, world, workdir, **options)


def greedy(model, ids: torch.Tensor, **options: Any) -> torch.Tensor:
    """``NEW_TOKENS`` greedy tokens (never stopping early), as the single-process reference makes them."""
    return model.generate(
        ids, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False, **options
    )


def requests(rank: int, world: int, workdir: Path, *, source: str, ids: torch.Tensor) -> dict:
    from torch.distributed.device_mesh import init_device_mesh
    from transformers import AutoModelForCausalLM, DistributedConfig

    import splice
    from splice.parallel import get_parallel_state

    def load(**request: Any):
        return splice.from_pretrained(AutoModelForCausalLM, source, fusion_config=FUSION, **request)

    line = init_device_mesh("cpu", (world,), mesh_dim_names=("tp",))
    asks: dict[str, dict[str, Any]] = {
        "DistributedConfig(tp_plan='auto')": dict(distributed_config=DistributedConfig(tp_plan="auto")),
        "DistributedConfig(tp_size)": dict(distributed_config=DistributedConfig(tp_size=world)),
        "dict(tp_plan)": dict(distributed_config={"tp_plan": "auto"}),
        "dict(tp_size)": dict(distributed_config={"tp_size": world}),
        "tp_plan": dict(tp_plan="auto"),
        "tp_size": dict(tp_plan="auto", tp_size=world),
        "tp_size alone": dict(tp_size=world),  # transformers: the model's own plan
        "1-D device_mesh": dict(distributed_config=DistributedConfig(tp_size=world), device_mesh=line),
    }
    refused: dict[str, dict[str, Any]] = {
        "config and tp_plan": dict(distributed_config=DistributedConfig(tp_size=world), tp_plan="auto"),
        "config and tp_size": dict(distributed_config={"tp_plan": "auto"}, tp_size=world),
        "tp_size=1": dict(distributed_config=DistributedConfig(tp_size=1)),
        "empty config": dict(distributed_config={}),
        "fsdp_size": dict(distributed_config={"tp_size": world, "fsdp_size": 2}),
        "tp_size disagrees with the mesh": dict(tp_plan="auto", tp_size=world // 2, device_mesh=line),
    }
    if world == 4:
        grid = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
        asks["(dp, tp) device_mesh"] = dict(distributed_config=DistributedConfig(tp_size=2), device_mesh=grid)
        asks["(dp, tp) device_mesh, tp_plan"] = dict(tp_plan="auto", device_mesh=grid)
        unnamed = init_device_mesh("cpu", (2, 2), mesh_dim_names=("rows", "columns"))
        refused["2-D mesh without tp"] = dict(tp_plan="auto", device_mesh=unnamed)

    out: dict[str, Any] = {"tp": {}, "logits": {}, "errors": {}}
    for name, request in asks.items():
        model = load(**request)
        out["tp"][name] = get_parallel_state(model).mesh.size()
        with torch.no_grad():
            out["logits"][name] = model(ids).logits
    for name, request in refused.items():
        out["errors"][name] = ranks.error_of(lambda request=request: load(**request))

    # greedy generation with a static KV cache: the cache holds this rank's kv heads (replicas included)
    model = load(distributed_config=DistributedConfig(tp_size=world))
    out["static"] = greedy(model, ids, cache_implementation="static")
    out["dynamic"] = greedy(model, ids)
    out["static_again"] = greedy(model, ids[:1], cache_implementation="static")  # a new cache, one row
    return out


SCENARIOS = {"requests": requests}
