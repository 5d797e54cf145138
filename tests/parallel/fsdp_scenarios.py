"""What each rank does in the FSDP2 / DCP tests (gloo, CPU). One spawn per world size; the parent checks.

Ranks start from a forkserver that has already imported torch, transformers and splice (as in
tp_scenarios.py), so a scenario costs its own work, not interpreters importing torch on two cores.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import ranks
import torch

PRELOAD = [
    "torch",
    "torch.distributed.fsdp",
    "torch.distributed.checkpoint",
    "torch.distributed.tensor.parallel",
    "transformers",
    "transformers.models.llama.modeling_llama",
    "splice.hf",
    "splice.parallel.view",
    "splice.parallel.fsdp",
    "splice.parallel.load",
    "tiny",
]
FUSION = {"qkv": True, "gate_up": True}
STEPS = 3
LR = 0.1


def spawn(scenario: str, world: int, workdir: Path, **options: Any) -> list[dict[str, Any]]:
    """Run ``scenario`` on ``world`` ranks (gloo, CPU); returns each rank's results."""
    return ranks.spawn(sys.modules[__name__], scenario, world, workdir, **options)


def shard(model, mesh=None) -> None:
    """FSDP2 as torchtitan and accelerate apply it: one unit per decoder layer, one on the root."""
    from torch.distributed.fsdp import fully_shard

    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)


def meta_model(source: Path, fusion: dict | None = FUSION):
    """The scalable recipe's first half: build on the meta device, fuse, shard, allocate (garbage)."""
    import transformers

    import splice

    config = transformers.AutoConfig.from_pretrained(source)
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config)
    if fusion:
        splice.fuse(model, fusion)
    shard(model)
    model.to_empty(device="cpu")
    for module in model.modules():  # non-persistent buffers (rotary inv_freq) are not in the checkpoint
        if hasattr(module, "original_inv_freq"):
            model._init_weights(module)
    return model


def _local_bytes(view: dict[str, Any]) -> int:
    from splice.parallel.view import RowPieces

    total = 0
    for tensor in view.values():
        local = tensor.to_local() if hasattr(tensor, "to_local") else tensor
        total += local.nbytes_local if isinstance(local, RowPieces) else local.numel() * local.element_size()
    return total


# --------------------------------------------------------------------------------------------------
# scenarios


def fsdp(rank: int, world: int, workdir: Path, *, source: str, ids: torch.Tensor) -> dict:
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp

    import splice

    source = Path(source)
    out: dict[str, Any] = {}

    # the scalable load: meta -> fuse -> fully_shard -> to_empty -> dcp.load through the original-layout view
    model = meta_model(source)
    view = splice.original_state_dict(model)
    out["view_keys"] = list(view)
    out["view_local_bytes"] = _local_bytes(view)
    dcp.load(view, storage_reader=dcp.HuggingFaceStorageReader(str(source)))
    out["loaded"] = {k: v.full_tensor() for k, v in model.state_dict().items()}
    with torch.no_grad():
        out["logits"] = model(ids).logits

    # the view aliases the parameters: a write through it is a write to the fused model
    qkv = model.model.layers[0].self_attn.qkv_proj.weight
    piece, offsets = (
        view["model.layers.0.self_attn.k_proj.weight"].to_local().pieces[0]
        if (view["model.layers.0.self_attn.k_proj.weight"].to_local().pieces)
        else view["model.layers.0.self_attn.q_proj.weight"].to_local().pieces[0]
    )
    before = qkv.to_local().clone()
    with torch.no_grad():
        saved = piece.clone()
        piece.fill_(7.0)
        out["alias_changed"] = int((qkv.to_local() != before).sum())
        piece.copy_(saved)
        out["alias_restored"] = torch.equal(qkv.to_local(), before)
    out["alias_numel"] = piece.numel()

    # export: every rank writes its rows through torch's HF writer; and splice.save_pretrained (rank 0 writes)
    dcp.save(
        splice.original_state_dict(model),
        storage_writer=dcp.HuggingFaceStorageWriter(
            str(workdir / "hf-writer"), save_distributed=True, enable_consolidation=True
        ),
    )
    splice.save_pretrained(model, workdir / "saved")
    splice.save_pretrained(model, workdir / "saved-state-dict", state_dict=model.state_dict())
    # accelerate / Trainer under FSDP2 with a full state dict: gathered by every rank, saved by rank 0 alone
    full = {k: v.full_tensor() for k, v in model.state_dict().items()}
    if rank == 0:
        splice.save_pretrained(model, workdir / "saved-full-state-dict", state_dict=full)
    dist.barrier()
    out["rank_failed"] = ranks.error_of(lambda: splice.save_pretrained(model, workdir / "blocker" / "out"))

    # surgery on a sharded model is refused, naming the order that works
    out["unfuse_refused"] = ranks.error_of(lambda: splice.unfuse(model))
    unfused = meta_model(source, fusion=None)
    out["fuse_refused"] = ranks.error_of(lambda: splice.fuse(unfused, FUSION))
    # norm_mlp moves the norm into the MLP: a rename, so the view passes its DTensors through
    out["norm_mlp_view"] = list(splice.original_state_dict(meta_model(source, fusion={"norm_mlp": True})))

    # training: each rank its slice of the batch; FSDP2 averages the gradients
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    per_rank = ids.shape[0] // world
    mine = ids[rank * per_rank : (rank + 1) * per_rank]
    losses = []
    for _ in range(STEPS):
        loss = model(mine, labels=mine).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        mean = loss.detach().clone()
        dist.all_reduce(mean)
        losses.append(mean / world)
    out["losses"] = torch.stack(losses)
    splice.save_pretrained(model, workdir / "trained")
    splice.save_pretrained(model, workdir / "trained-runtime", save_original_format=False)
    dcp.save(model.state_dict(), checkpoint_id=str(workdir / "dcp"))  # torch's own, for resuming

    # resume: a fresh sharded model from torch's DCP checkpoint
    resumed = meta_model(source)
    state = resumed.state_dict()
    dcp.load(state, checkpoint_id=str(workdir / "dcp"))
    out["resumed_equal"] = all(
        torch.equal(a.to_local(), b.to_local())
        for a, b in zip(resumed.state_dict().values(), model.state_dict().values())
    )
    return out


def two_d(rank: int, world: int, workdir: Path, *, source: str, ids: torch.Tensor) -> dict:
    """FSDP2 over the data-parallel dim of a (dp x tp) mesh whose tp dim is splice's tensor parallelism."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.device_mesh import init_device_mesh
    from transformers import AutoModelForCausalLM

    import splice

    out: dict[str, Any] = {}
    mesh = init_device_mesh("cpu", (world // 2, 2), mesh_dim_names=("dp", "tp"))
    model = splice.from_pretrained(
        AutoModelForCausalLM, source, fusion_config=FUSION, tp_plan="auto", device_mesh=mesh["tp"]
    )
    shard(model, mesh=mesh["dp"])
    # before any forward: FSDP2 leaves the root's parameters unsharded after a forward without backward
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    qkv = model.model.layers[0].self_attn.qkv_proj.weight
    out["placements"] = [str(p) for p in qkv.placements]
    with torch.no_grad():
        out["logits"] = model(ids).logits
    model.train()
    dp, dp_rank = mesh["dp"].size(), mesh["dp"].get_local_rank()
    per_rank = ids.shape[0] // dp
    mine = ids[dp_rank * per_rank : (dp_rank + 1) * per_rank]
    losses = []
    for _ in range(STEPS):
        loss = model(mine, labels=mine).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        mean = loss.detach().clone()
        dist.all_reduce(mean)
        losses.append(mean / world)  # the tp ranks of one dp rank saw the same loss
    out["losses"] = torch.stack(losses)
    splice.save_pretrained(model, workdir / "trained-2d")
    view = splice.original_state_dict(model)  # TP layout and FSDP2 shard undone, still no gather
    out["view_local_bytes"] = _local_bytes(view)
    dcp.save(
        view,
        storage_writer=dcp.HuggingFaceStorageWriter(
            str(workdir / "hf-writer-2d"), save_distributed=True, enable_consolidation=True
        ),
    )
    return out


SCENARIOS = {"fsdp": fsdp, "two_d": two_d}
