"""LoRA training under tensor parallelism, end to end: gloo on CPU, a tiny GQA Llama, 2 and 4 ranks.

The ranks train with ``splice.peft`` on a TP model (see lora_tp_scenarios.py); this file trains vanilla
PEFT on the unmodified one-process model from the same seed, and checks: the same initial factors bit
for bit, the same losses and logits, an adapter file that vanilla ``peft.PeftModel`` loads onto the
unmodified model with equal logits, and vanilla adapters loading onto TP models. At 4 ranks the 2 kv
heads are replicated and the intermediate size 90 is padded to 92, so B of k_proj carries replicas and
B of gate/up and A of down_proj carry padding.
"""

from __future__ import annotations

import json

import lora_tp_scenarios as scenarios
import pytest
import tiny
import torch

from splice.checkpoint import load_state_dict

peft = pytest.importorskip("peft")
pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="needs torch.distributed")

IDS = tiny.token_ids(batch=2, length=9)
STEPS = 3
ADAPTER = "adapter_model.safetensors"


def reference(intermediate: int, source, opt: str):
    """Vanilla PEFT on the unmodified one-process model: initial and trained factors, losses, logits."""
    from peft.utils import get_peft_model_state_dict

    model = tiny.causal_lm("llama", intermediate_size=intermediate)
    tiny.save(model, source)
    torch.manual_seed(scenarios.SEED)
    peft_model = peft.get_peft_model(model, scenarios.lora_config())
    initial = {k: v.clone() for k, v in get_peft_model_state_dict(peft_model).items()}
    losses = scenarios.train(peft_model, IDS, opt, STEPS)
    trained = {k: v.clone() for k, v in get_peft_model_state_dict(peft_model).items()}
    return dict(initial=initial, trained=trained, losses=losses, logits=scenarios._logits(peft_model, IDS))


def vanilla_logits(source, adapter) -> torch.Tensor:
    model = tiny.T.AutoModelForCausalLM.from_pretrained(source)
    return scenarios._logits(peft.PeftModel.from_pretrained(model, adapter), IDS)


def check(ranks, ref, workdir, source, tag):
    for r, out in enumerate(ranks):
        assert out["all_dtensors"], r
        torch.testing.assert_close(torch.stack(out["losses"]), torch.stack(ref["losses"]), atol=1e-5, rtol=0)
        torch.testing.assert_close(out["logits"], ref["logits"], atol=1e-5, rtol=0)
        for name in ("loaded_fused_logits", "loaded_unfused_logits"):
            torch.testing.assert_close(out[name], ref["logits"], atol=1e-5, rtol=0, msg=f"rank {r} {name}")
        torch.testing.assert_close(
            torch.stack(out["resumed_losses"]), torch.stack(ref["losses"]), atol=1e-5, rtol=0
        )
        assert "merging a LoRA into a tensor-parallel base weight is not supported" in out["merge_refused"]
        assert out["second"] == ("DTensor", "Shard(dim=0)", False)
        assert (
            "qkv_proj: LoRA under tensor parallelism cannot wrap it: it is a fused Linear"
            in (out["fuse_lora_refused"])
        )

    # one vanilla adapter, written by rank 0, by original names: the initial one is the reference's, bit for bit
    initial = load_state_dict(workdir / f"init-{tag}", weights_name=ADAPTER)
    assert sorted(initial) == sorted(ref["initial"])  # safetensors sorts keys
    assert [k for k, v in ref["initial"].items() if not torch.equal(initial[k], v)] == []
    config = json.loads((workdir / f"init-{tag}" / "adapter_config.json").read_text())
    assert sorted(config["target_modules"]) == sorted(scenarios.TARGETS) and config["r"] == 4
    moved = sum((ref["trained"][k] - v).norm() ** 2 for k, v in ref["initial"].items()) ** 0.5
    assert moved > 1e-2  # the steps moved the factors far beyond the tolerance they are compared with
    for name in (f"trained-{tag}", f"resumed-{tag}"):
        trained = load_state_dict(workdir / name, weights_name=ADAPTER)
        assert sorted(trained) == sorted(ref["trained"])
        for key, value in ref["trained"].items():
            torch.testing.assert_close(trained[key], value, atol=1e-5, rtol=0, msg=f"{name} {key}")
        torch.testing.assert_close(vanilla_logits(source, workdir / name), ref["logits"], atol=1e-5, rtol=0)
    assert not any(workdir.glob(f"init-{tag}/*/"))  # one adapter directory, no per-rank leftovers


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("lora_tp")


def test_world_2_fused_sgd(workdir):
    source = workdir / "source-2"
    ref = reference(96, source, "sgd")
    fusion = {"qkv": True, "gate_up": True}
    ranks = scenarios.spawn(
        "lora", 2, workdir, source=str(source), ids=IDS, opt="sgd", steps=STEPS, fusion=fusion, clip="torch"
    )
    check(ranks, ref, workdir, source, "2-fused")
    placements = ranks[0]["placements"]
    # column-parallel base: A replicated, B cut along its rows; row-parallel base: A cut along its columns
    assert placements["k_proj"] == ("DTensor", ("Replicate()",), (4, 64), ("Shard(dim=0)",), (16, 4))
    assert placements["gate_proj"] == ("DTensor", ("Replicate()",), (4, 64), ("Shard(dim=0)",), (48, 4))
    assert placements["down_proj"] == ("DTensor", ("Shard(dim=1)",), (4, 48), ("Replicate()",), (64, 4))


def test_world_4_replicated_kv_padded_mlp_adamw(workdir):
    source = workdir / "source-4"
    ref = reference(90, source, "adamw")
    fusion = {"qkv": True, "gate_up": True}
    ranks = scenarios.spawn(
        "lora",
        4,
        workdir,
        source=str(source),
        ids=IDS,
        opt="adamw",
        steps=STEPS,
        fusion=fusion,
        clip="splice",
    )
    check(ranks, ref, workdir, source, "4-fused")
    for rank, out in enumerate(ranks):
        placements = out["placements"]
        assert placements["k_proj"][4] == (16, 4)  # one of the 2 kv heads, replicated on 2 ranks
        assert placements["gate_proj"][4] == (23, 4)  # 92 padded rows / 4
        assert placements["down_proj"][2] == (4, 23)
        assert "copy 1 of block 0 differs from copy 0" in out["diverged"], rank
        assert "non-zero values" in out["dirty_padding"], rank
        assert "vocabulary-parallel embedding" in out["embedding_refused"], rank
    assert not (workdir / "diverged").exists() and not (workdir / "dirty").exists()


def test_world_2_unfused(workdir):
    source = workdir / "source-2u"
    ref = reference(96, source, "adamw")
    ranks = scenarios.spawn(
        "lora", 2, workdir, source=str(source), ids=IDS, opt="adamw", steps=STEPS, fusion={}, clip="splice"
    )
    check(ranks, ref, workdir, source, "2-unfused")
