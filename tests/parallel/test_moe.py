"""MoE experts under tensor and expert parallelism: gloo on CPU, a tiny Mixtral and a tiny Qwen3-MoE, 2 and 4 ranks.

The checkpoints hold one tensor per expert and projection (as transformers saves them); the models one
stacked ``[E, 2I, H]`` gate_up and ``[E, H, I]`` down per layer. Each spawn loads with the model's own
plan (tensor parallel) or with ``DistributedConfig(ep_size=...)`` (expert parallel) and the ranks'
results are checked here against the single-process model: logits, greedy tokens, loss, gradients, the
gathered state dict bitwise, each rank's own expert weights, the bytes each rank read, and the saved
and consolidated checkpoints byte for byte.
"""

from __future__ import annotations

import json

import moe_scenarios
import pytest
import tiny
import torch
from test_tp import consolidate_offline, same_files

from splice.checkpoint import load_state_dict

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="needs torch.distributed")

IDS = tiny.token_ids(batch=2, length=9)
EXPERTS = "model.layers.{}.mlp.experts.{}"


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("moe")


def reference(kind: str, source, **overrides) -> dict:
    model = tiny.causal_lm(kind, **overrides)
    tiny.save(model, source)
    with torch.no_grad():
        logits = model(IDS).logits
    generated = model.generate(IDS[:1], max_new_tokens=6, do_sample=False, min_new_tokens=6)
    model.train()
    loss = model(IDS, labels=IDS).loss
    loss.backward()
    return dict(
        logits=logits,
        generated=generated,
        loss=loss.detach(),
        grads={k: p.grad.clone() for k, p in model.named_parameters()},
        state_dict={k: v.clone() for k, v in model.state_dict().items()},
    )


def run(workdir, name: str, kind: str, world: int, *, ep: bool, refuse=None, options=None, **overrides):
    """The reference, the spawn, and every check that holds for any layout; returns (ranks, ref, source)."""
    source = workdir / f"source-{name}"
    ref = reference(kind, source, **overrides)
    ranks = moe_scenarios.spawn(
        "moe",
        world,
        workdir,
        source=str(source),
        ids=IDS,
        name=name,
        ep=ep,
        refuse=refuse,
        options=options or {},
    )
    for r, out in enumerate(ranks):
        torch.testing.assert_close(out["logits"], ref["logits"], atol=1e-5, rtol=0)
        assert torch.equal(out["generated"], ref["generated"]), r
        torch.testing.assert_close(out["loss"], ref["loss"], atol=1e-6, rtol=0)
    rank0 = ranks[0]
    assert all(out["grads"] is None and out["state_dict"] is None for out in ranks[1:])
    assert rank0["grads"].keys() == ref["grads"].keys()
    for key, grad in ref["grads"].items():
        torch.testing.assert_close(rank0["grads"][key], grad, atol=2e-6, rtol=1e-4, msg=key)
    assert list(rank0["state_dict"]) == list(ref["state_dict"])
    assert [k for k, v in ref["state_dict"].items() if not torch.equal(rank0["state_dict"][k], v)] == []

    # each rank read every byte of its own pieces once: the ranks together read each sharded byte once,
    # plus the second copy of each kv head where kv heads are fewer than the ranks
    checkpoint = load_state_dict(source)
    assert any(
        ".experts.0." in k for k in checkpoint
    )  # per-expert tensors on disk (Mixtral: block_sparse_moe.experts.0.w1)
    whole = sum(
        t.nbytes for k, t in checkpoint.items() if "norm" in k or k.endswith(".gate.weight")
    )  # + routers
    sharded = sum(t.nbytes for t in checkpoint.values()) - whole
    kv = sum(t.nbytes for k, t in checkpoint.items() if "k_proj" in k or "v_proj" in k) if world > 2 else 0
    assert sum(out["bytes"]["sharded"] for out in ranks) == sharded + kv
    assert all(out["bytes"]["replicated"] == whole for out in ranks)

    # splice.original_state_dict: per-expert views of the ranks' pieces, which DCP's HF writer writes whole
    written = load_state_dict(workdir / f"dcp-{name}")
    assert sorted(written) == sorted(checkpoint)
    assert [k for k, v in checkpoint.items() if not torch.equal(written[k], v)] == []

    # save_pretrained under TP/EP, and splice consolidate offline from the shards: the source, byte for byte
    assert same_files(source, workdir / f"saved-{name}") == ["model.safetensors"]
    result = consolidate_offline(workdir / f"shards-{name}", workdir / f"consolidated-{name}")
    assert result.returncode == 0, result.stderr
    assert same_files(source, workdir / f"consolidated-{name}") == ["model.safetensors"]
    return ranks, ref


def tp_pieces(stacked_gate_up: torch.Tensor, down: torch.Tensor, world: int, rank: int):
    """What a rank of ``world`` holds of one layer's experts: transformers' packed_colwise and rowwise cuts,
    with the intermediate size padded with zeros to a multiple of ``world``."""
    size = down.shape[2]
    padded = -(-size // world) * world
    piece = slice(rank * padded // world, (rank + 1) * padded // world)
    gate = torch.nn.functional.pad(stacked_gate_up[:, :size], (0, 0, 0, padded - size))
    up = torch.nn.functional.pad(stacked_gate_up[:, size:], (0, 0, 0, padded - size))
    down = torch.nn.functional.pad(down, (0, padded - size))
    return torch.cat([gate[:, piece], up[:, piece]], dim=1), down[:, :, piece]


def test_mixtral_tensor_parallel_world_2(workdir):
    ranks, ref = run(workdir, "mixtral-tp-2", "mixtral", 2, ep=False)
    sd = ref["state_dict"]
    for rank, out in enumerate(ranks):
        assert out["gate_up"] == (5, 96, 64) and out["down"] == (5, 64, 48) and out["num_experts"] == 5
        gate_up, down = tp_pieces(
            sd[EXPERTS.format(0, "gate_up_proj")], sd[EXPERTS.format(0, "down_proj")], 2, rank
        )
        assert torch.equal(out["gate_up_local"], gate_up) and torch.equal(out["down_local"], down)
    meta = json.loads((workdir / "shards-mixtral-tp-2" / "splice-parallel.json").read_text())
    assert meta["tensors"][EXPERTS.format(1, "gate_up_proj")]["dim"] == 1
    assert meta["tensors"][EXPERTS.format(1, "down_proj")]["dim"] == 2


def test_qwen3_moe_tensor_parallel_world_4_padded(workdir):
    # 42 intermediate rows do not divide by 4: gate and up each padded to 44 (11 per rank), down's columns too.
    # experts_implementation="eager" on both sides: torch's CPU grouped_mm needs 16-byte strides (42 and 11 floats are not)
    eager = {"experts_implementation": "eager"}
    ranks, ref = run(
        workdir, "qwen3-tp-4", "qwen3_moe", 4, ep=False, options=eager, moe_intermediate_size=42, **eager
    )
    sd = ref["state_dict"]
    for rank, out in enumerate(ranks):
        assert out["gate_up"] == (5, 22, 64) and out["down"] == (5, 64, 11)
        gate_up, down = tp_pieces(
            sd[EXPERTS.format(0, "gate_up_proj")], sd[EXPERTS.format(0, "down_proj")], 4, rank
        )
        assert torch.equal(out["gate_up_local"], gate_up) and torch.equal(out["down_local"], down)
    assert torch.count_nonzero(ranks[3]["gate_up_local"][:, 10]) == 0  # gate's padding row on the last rank


def test_mixtral_expert_parallel_world_4(workdir):
    # 4 experts on 4 ranks: one whole expert each; the refusals use a 5-expert checkpoint
    bad = workdir / "source-five-experts"
    tiny.save(tiny.causal_lm("mixtral"), bad)
    ranks, ref = run(
        workdir, "mixtral-ep-4", "mixtral", 4, ep=True, refuse=str(bad), num_local_experts=4, num_experts=4
    )
    sd = ref["state_dict"]
    for rank, out in enumerate(ranks):
        assert out["gate_up"] == (1, 192, 64) and out["down"] == (1, 64, 96) and out["num_experts"] == 1
        assert torch.equal(out["gate_up_local"], sd[EXPERTS.format(0, "gate_up_proj")][rank : rank + 1])
        assert torch.equal(out["down_local"], sd[EXPERTS.format(0, "down_proj")][rank : rank + 1])
        assert out["indivisible"] == (
            "LoadError: model.layers.0.mlp.experts: 5 experts cannot be split evenly across 4 expert-parallel "
            "ranks; ep_size must divide 5 (5)"
        )
        assert out["ep_size"] == (
            "LoadError: ep_size=8 with tp_size=4: splice runs expert parallelism over the tensor-parallel "
            "ranks, so ep_size must equal tp_size (4)"
        )
    meta = json.loads((workdir / "shards-mixtral-ep-4" / "splice-parallel.json").read_text())
    assert meta["tensors"][EXPERTS.format(1, "gate_up_proj")]["dim"] == 0
    assert meta["tensors"][EXPERTS.format(1, "down_proj")]["dim"] == 0


def test_qwen3_moe_expert_parallel_world_2(workdir):
    ranks, ref = run(workdir, "qwen3-ep-2", "qwen3_moe", 2, ep=True, num_experts=6, num_local_experts=6)
    sd = ref["state_dict"]
    for rank, out in enumerate(ranks):
        assert out["gate_up"] == (3, 80, 64) and out["down"] == (3, 64, 40) and out["num_experts"] == 3
        mine = slice(3 * rank, 3 * rank + 3)
        assert torch.equal(out["gate_up_local"], sd[EXPERTS.format(0, "gate_up_proj")][mine])
        assert torch.equal(out["down_local"], sd[EXPERTS.format(0, "down_proj")][mine])
