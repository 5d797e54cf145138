"""FSDP2 (fully_shard) and DCP on a fused model, end to end: gloo on CPU, world 2, a tiny GQA Llama.

One spawn runs everything (fsdp_scenarios.py); this file checks what the ranks saw against one process:
the unfused model (losses, trained weights), its checkpoint (loads, exports) and splice's own save.
"""

from __future__ import annotations

import copy
import filecmp
import shutil
from pathlib import Path

import fsdp_scenarios
import pytest
import tiny
import torch
import transformers
from safetensors.torch import load_file

import splice

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="needs torch.distributed")

# one kv head: q is 64 rows, k and v 16 each, so rank 0's 48 rows of qkv_proj end inside q
CONFIG = dict(num_key_value_heads=1, attention_bias=True, intermediate_size=72)
IDS = tiny.token_ids(batch=4, length=9)
WORLD = 2


def tensors(directory: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for path in sorted(directory.glob("*.safetensors")):
        out.update(load_file(path))
    return out


def same_files(a: Path, b: Path) -> None:
    names = sorted(p.name for p in a.iterdir() if p.is_file())
    assert names == sorted(p.name for p in b.iterdir() if p.is_file())
    assert [n for n in names if not filecmp.cmp(a / n, b / n, shallow=False)] == []


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("fsdp")
    model = tiny.causal_lm("llama", **CONFIG)
    source = tiny.save(model, workdir / "source")
    (workdir / "blocker").write_text("a file where a directory is expected")
    ranks = fsdp_scenarios.spawn("fsdp", WORLD, workdir, source=str(source), ids=IDS)

    reference: dict = {"state_dict": {k: v.clone() for k, v in model.state_dict().items()}}
    with torch.no_grad():
        reference["logits"] = model(IDS).logits
    fused = copy.deepcopy(model)
    splice.fuse(fused, fsdp_scenarios.FUSION)
    reference["fused"] = {k: v.clone() for k, v in fused.state_dict().items()}
    splice.save_pretrained(fused, workdir / "reference-saved")

    model.train()  # one process, unfused, the whole batch
    optimizer = torch.optim.SGD(model.parameters(), lr=fsdp_scenarios.LR)
    losses = []
    for _ in range(fsdp_scenarios.STEPS):
        loss = model(IDS, labels=IDS).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.detach())
    reference["losses"] = torch.stack(losses)
    reference["trained"] = {k: v.clone() for k, v in model.state_dict().items()}
    return workdir, ranks, reference


def test_meta_device_load_through_the_view_is_the_checkpoint(run):
    _, ranks, ref = run
    for out in ranks:
        assert list(out["loaded"]) == list(ref["fused"])
        assert [k for k, v in ref["fused"].items() if not torch.equal(out["loaded"][k], v)] == []
        torch.testing.assert_close(out["logits"], ref["logits"], atol=1e-6, rtol=0)
        assert out["view_keys"] == list(ref["state_dict"])  # original names, original order


def test_view_holds_only_local_rows_and_aliases_the_parameters(run):
    _, ranks, ref = run
    checkpoint = sum(v.numel() * v.element_size() for v in ref["state_dict"].values())
    assert sum(out["view_local_bytes"] for out in ranks) == checkpoint  # every byte once, no replicas
    for out in ranks:
        assert out["view_local_bytes"] <= 0.55 * checkpoint
        assert out["alias_numel"] > 0 and out["alias_changed"] == out["alias_numel"]
        assert out["alias_restored"]


def test_hf_writer_through_the_view_is_the_original_checkpoint(run):
    workdir, _, ref = run
    written = tensors(workdir / "hf-writer")
    assert sorted(written) == sorted(ref["state_dict"])
    assert [k for k, v in ref["state_dict"].items() if not torch.equal(written[k], v)] == []
    saved = tensors(workdir / "saved")  # splice.save_pretrained's, bitwise the same tensors
    assert sorted(saved) == sorted(written)
    assert [
        k for k, v in saved.items() if not (v.dtype == written[k].dtype and torch.equal(v, written[k]))
    ] == []
    # vanilla transformers loads it
    shutil.copy(workdir / "source" / "config.json", workdir / "hf-writer" / "config.json")
    vanilla = transformers.AutoModelForCausalLM.from_pretrained(workdir / "hf-writer")
    with torch.no_grad():
        assert torch.equal(vanilla(IDS).logits, ref["logits"])


def test_save_pretrained_is_collective_and_byte_identical(run):
    workdir, _, _ = run
    same_files(workdir / "saved", workdir / "reference-saved")
    same_files(workdir / "saved-state-dict", workdir / "reference-saved")


def test_a_rank_failing_mid_save_fails_every_rank(run):
    workdir, ranks, _ = run
    assert ranks[0]["rank_failed"] is not None and "blocker" in ranks[0]["rank_failed"]
    assert ranks[1]["rank_failed"].startswith(
        "SpliceError: save_pretrained failed on another rank, nothing was written: rank 0:"
    )
    assert (workdir / "blocker").is_file()


def test_surgery_on_a_sharded_model_says_to_fuse_first(run):
    _, ranks, _ = run
    for out in ranks:
        assert out["unfuse_refused"].startswith(
            "FusionError: 'qkv' at model.layers.0.self_attn: model.layers.0.self_attn.qkv_proj.weight is sharded"
        )
        assert "unfuse before fully_shard (fusing goes before sharding)" in out["unfuse_refused"]
        assert out["fuse_refused"].startswith("FusionError: 'qkv' at model.layers.0.self_attn: ")
        assert out["fuse_refused"].endswith("fuse before fully_shard (or tensor parallelism)")


def test_training_matches_one_unfused_process(run):
    workdir, ranks, ref = run
    for out in ranks:
        torch.testing.assert_close(out["losses"], ref["losses"], atol=1e-5, rtol=0)
        assert out["resumed_equal"]
    trained = tensors(workdir / "trained")
    assert sorted(trained) == sorted(ref["trained"])
    for key, value in ref["trained"].items():
        torch.testing.assert_close(trained[key], value, atol=1e-5, rtol=0, msg=key)
