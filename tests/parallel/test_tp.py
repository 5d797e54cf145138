"""Tensor parallelism end to end: gloo on CPU, a tiny GQA Llama fused qkv + gate_up, 2 and 4 ranks.

One spawn per world size runs everything (see tp_scenarios.py); this file checks what the ranks saw
against the single-process, unfused model, and consolidates their shards offline.
"""

from __future__ import annotations

import filecmp
import json
import mmap
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import tiny
import torch
import tp_scenarios

from splice.checkpoint import load_state_dict
from splice.errors import CheckpointError
from splice.parallel.consolidate import consolidate

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="needs torch.distributed")

IDS = tiny.token_ids(batch=2, length=9)


def reference(intermediate: int, source: Path, **save):
    """The unfused single-process model, its checkpoint, and what the ranks must reproduce."""
    model = tiny.causal_lm("llama", intermediate_size=intermediate)
    tiny.save(model, source, **save)
    with torch.no_grad():
        logits = model(IDS).logits
    generated = model.generate(IDS[:1], max_new_tokens=10, do_sample=False, min_new_tokens=10)
    model.train()
    loss = model(IDS, labels=IDS).loss
    loss.backward()
    grads = {k: p.grad.clone() for k, p in model.named_parameters()}
    state_dict = {k: v.clone() for k, v in model.state_dict().items()}
    torch.optim.SGD(model.parameters(), lr=0.5).step()
    stepped = {k: v.clone() for k, v in model.state_dict().items()}
    return dict(
        logits=logits,
        generated=generated,
        loss=loss.detach(),
        grads=grads,
        state_dict=state_dict,
        stepped=stepped,
    )


def same_files(a: Path, b: Path, pattern: str = "model*") -> list[str]:
    names = sorted(p.name for p in a.glob(pattern))
    assert names == sorted(p.name for p in b.glob(pattern))
    assert [n for n in names if not filecmp.cmp(a / n, b / n, shallow=False)] == []
    return names


def check_common(ranks, ref, world):
    rank0 = ranks[0]
    for r, out in enumerate(ranks):
        torch.testing.assert_close(out["logits"], ref["logits"], atol=1e-5, rtol=0)
        # no gradient recorded: local shards, no DTensor op, one all-reduce per row-parallel Linear and
        # the embedding (and an all-gather of the lm_head's logits); bit for bit DTensor's grad-mode result
        assert torch.equal(out["logits"], out["dtensor_path_logits"]), r
        assert out["local_path"] == {"dtensor_ops": [], "all_reduces": 2 * 2 + 1}, r  # 2 layers
        assert torch.equal(out["generated"], ref["generated"]), r
        torch.testing.assert_close(out["loss"], ref["loss"], atol=1e-6, rtol=0)
    assert all(r["grads"] is None and r["state_dict"] is None for r in ranks[1:])  # rank 0 gathers
    assert rank0["grads"].keys() == ref["grads"].keys()
    for key, grad in ref["grads"].items():
        torch.testing.assert_close(rank0["grads"][key], grad, atol=2e-6, rtol=1e-4, msg=key)
    assert list(rank0["state_dict"]) == list(ref["state_dict"])
    assert [k for k, v in ref["state_dict"].items() if not torch.equal(rank0["state_dict"][k], v)] == []
    runtime = rank0["runtime_state_dict"]
    assert (
        "model.layers.0.self_attn.qkv_proj.weight" in runtime
        and "model.layers.0.mlp.gate_up_proj.weight" in runtime
    )
    sd = ref["state_dict"]
    fused = torch.cat([sd[f"model.layers.1.self_attn.{n}_proj.weight"] for n in "qkv"])
    assert torch.equal(runtime["model.layers.1.self_attn.qkv_proj.weight"], fused)


def consolidate_offline(shards: Path, out: Path) -> subprocess.CompletedProcess:
    """``splice consolidate`` in a fresh interpreter that must never import transformers."""
    code = (
        "import sys; from splice.cli import main; rc = main(sys.argv[1:]); "
        "assert 'transformers' not in sys.modules, 'consolidate imported transformers'; sys.exit(rc)"
    )
    return subprocess.run(
        [sys.executable, "-c", code, "consolidate", str(shards), str(out), "--quiet"],
        capture_output=True,
        text=True,
    )


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("tp")


def test_world_2_sharded_source(workdir):
    source = workdir / "source-2"
    ref = reference(96, source, max_shard_size="100KB")
    assert len(list(source.glob("model-*.safetensors"))) > 1  # a sharded source, with an index
    ranks = tp_scenarios.spawn("llama", 2, workdir, source=str(source), ids=IDS, extra_loads=True)
    check_common(ranks, ref, 2)

    local = ranks[0]["local"]
    assert local["qkv_proj"] == (64, 64)  # [q_r (2 heads) | k_r (1) | v_r (1)] x 16
    assert local["qkv_bounds"] == ((0, 32), (32, 48), (48, 64))
    assert local["num_key_value_groups"] == 2 and local["class_untouched"]
    assert local["gate_up_proj"] == (96, 64) and local["gate_up_bounds"] == ((0, 48), (48, 96))
    assert local["down_proj"] == (64, 48) and local["embed"] == (64, 64) and local["norm_is_plain"]
    assert local["k_slice_is_local"]
    half = tiny.T.AutoModelForCausalLM.from_pretrained(source, dtype=torch.bfloat16)
    with torch.no_grad():
        half_logits = half(IDS).logits
    for out in ranks:
        assert out["bf16_logits"].dtype == torch.bfloat16
        torch.testing.assert_close(out["bf16_logits"].float(), half_logits.float(), atol=3e-2, rtol=0)
        torch.testing.assert_close(out["distributed_config_logits"], ref["logits"], atol=1e-5, rtol=0)
        torch.testing.assert_close(out["unfused_logits"], ref["logits"], atol=1e-5, rtol=0)
        assert out["unfused_q_proj"] == (32, 64)

    # each rank reads half of every sharded weight, and the norms whole
    checkpoint = load_state_dict(source)
    norms = sum(t.nbytes for k, t in checkpoint.items() if "norm" in k)
    sharded = sum(t.nbytes for t in checkpoint.values()) - norms
    for out in ranks:
        assert out["bytes"]["sharded"] == sharded // 2
        assert out["bytes"]["replicated"] == norms
        assert out["bytes"]["total"] == sharded // 2 + norms
        # the vocab halves of embed_tokens and lm_head are whole-row runs: mapped, not copied; so are the
        # whole pages of fused rows that line up with the file's pages (splice.checkpoint._stitch)
        vocab = sum(checkpoint[k].nbytes for k in ("model.embed_tokens.weight", "lm_head.weight"))
        extra = out["bytes"]["mapped"] - vocab // 2
        assert extra >= 0 and extra % mmap.PAGESIZE == 0

    # save_pretrained under TP writes the source checkpoint back, files and index byte for byte
    assert len(same_files(source, workdir / "saved-2")) > 2
    # so does splice consolidate, offline, from the per-rank shards
    result = consolidate_offline(workdir / "shards-2", workdir / "consolidated-2")
    assert result.returncode == 0, result.stderr
    assert len(same_files(source, workdir / "consolidated-2")) > 2
    meta = json.loads((workdir / "shards-2" / "splice-parallel.json").read_text())
    assert meta["fusion_config"] == {"qkv": True, "gate_up": True} and meta["world_size"] == 2
    assert meta["tensors"]["model.layers.0.mlp.down_proj.weight"]["dim"] == 1
    assert meta["tensors"]["model.norm.weight"]["dim"] is None

    stepped = load_state_dict(workdir / "stepped-2")
    for key, value in ref["stepped"].items():
        torch.testing.assert_close(stepped[key], value, atol=2e-6, rtol=1e-4, msg=key)


def test_world_4_replicated_kv_and_padded_mlp(workdir):
    source = workdir / "source-4"
    # 90 does not divide by 4: gate/up padded to 92, down_proj's columns too
    ref = reference(90, source, max_shard_size="100KB")
    ranks = tp_scenarios.spawn("llama", 4, workdir, source=str(source), ids=IDS, extra_loads=False)
    check_common(ranks, ref, 4)

    for rank, out in enumerate(ranks):
        local = out["local"]
        assert local["qkv_proj"] == (48, 64)  # 1 q head, 1 of the 2 kv heads (replicated 2x), 1 v head
        assert local["qkv_bounds"] == ((0, 16), (16, 32), (32, 48))
        assert local["num_key_value_groups"] == 1 and local["class_untouched"]  # local heads: 1 q per kv
        assert local["gate_up_proj"] == (46, 64) and local["gate_up_bounds"] == ((0, 23), (23, 46))
        assert local["down_proj"] == (64, 23)
        assert (
            "copy 1 of block 0 differs from copy 0" in out["diverged"]
            if rank == 0
            else out["diverged"] is None
        )
        assert "non-zero values" in out["dirty_padding"] if rank == 0 else out["dirty_padding"] is None
        assert "copy 1 of block 0 differs from copy 0" in out["diverged_save"]
        if rank:
            assert (
                "save_pretrained failed on another rank, nothing was written: rank 0" in out["diverged_save"]
            )
    assert not (workdir / "diverged-4").exists()

    # bytes read: a quarter of every sharded weight, except that kv heads are read by 2 ranks each
    checkpoint = load_state_dict(source)
    norms = sum(t.nbytes for k, t in checkpoint.items() if "norm" in k)
    kv = sum(t.nbytes for k, t in checkpoint.items() if "k_proj" in k or "v_proj" in k)
    sharded = sum(t.nbytes for t in checkpoint.values()) - norms
    per_rank = [out["bytes"]["sharded"] for out in ranks]
    assert sum(per_rank) == sharded + kv  # every byte once, plus each kv head's second copy
    assert max(per_rank) <= (sharded + kv) / 4 * 1.02
    assert all(out["bytes"]["replicated"] == norms for out in ranks)

    # files and index (total_parameters counts the model, not its replicas and padding) byte for byte
    assert len(same_files(source, workdir / "saved-4")) > 2
    result = consolidate_offline(workdir / "shards-4", workdir / "consolidated-4")
    assert result.returncode == 0, result.stderr
    assert len(same_files(source, workdir / "consolidated-4")) > 2
    layout = json.loads((workdir / "shards-4" / "splice-parallel.json").read_text())["layout"]
    qkv = next(g for g in layout["groups"] if g["fused_name"] == "qkv_proj")
    assert [(p["name"], p["replicas"], p["padding"]) for p in qkv["parts"]] == [
        ("q_proj", 1, 0),
        ("k_proj", 2, 0),
        ("v_proj", 2, 0),
    ]
    gate_up = next(g for g in layout["groups"] if g["fused_name"] == "gate_up_proj")
    assert [(p["name"], p["padding"], p["local_rows"]) for p in gate_up["parts"]] == [
        ("gate_proj", 2, 23),
        ("up_proj", 2, 23),
    ]

    stepped = load_state_dict(workdir / "stepped-4")  # replicas stayed equal through an optimizer step
    for key, value in ref["stepped"].items():
        torch.testing.assert_close(stepped[key], value, atol=2e-6, rtol=1e-4, msg=key)

    # a missing or an extra shard is an error naming it
    broken = workdir / "shards-4-missing"
    shutil.copytree(workdir / "shards-4", broken)
    (broken / "rank-00002-of-00004.safetensors").unlink()
    with pytest.raises(
        CheckpointError, match=r"shard rank-00002-of-00004\.safetensors \(rank 2 of 4\) is missing"
    ):
        consolidate(broken, workdir / "never")
    shutil.copy(broken.parent / "shards-4" / "rank-00002-of-00004.safetensors", broken)
    shutil.copy(broken / "rank-00003-of-00004.safetensors", broken / "rank-00004-of-00005.safetensors")
    with pytest.raises(CheckpointError, match=r"unexpected shard file rank-00004-of-00005\.safetensors"):
        consolidate(broken, workdir / "never")
    result = consolidate_offline(broken, workdir / "never")
    assert result.returncode == 2 and "rank-00004-of-00005.safetensors" in result.stderr
    (broken / "rank-00004-of-00005.safetensors").unlink()

    # a kv replica that drifted apart, or padding that is not zero, is refused rather than merged or dropped
    qkv, gate_up = "model.layers.0.self_attn.qkv_proj.weight", "model.layers.0.mlp.gate_up_proj.weight"
    edit(broken / "rank-00001-of-00004.safetensors", qkv, lambda t: t[16].add_(1))  # rank 1: k head 0, copy 1
    with pytest.raises(
        CheckpointError, match=r"k_proj.weight: rows 0:16 along dim 0 are replicated, and rank 1's"
    ):
        consolidate(broken, workdir / "never")
    shutil.copy(workdir / "shards-4" / "rank-00001-of-00004.safetensors", broken)
    edit(broken / "rank-00003-of-00004.safetensors", gate_up, lambda t: t[-1].fill_(1))  # up_proj's padding
    with pytest.raises(
        CheckpointError, match=r"gate_up_proj.weight: rank 3 holds non-zero values where its piece is padding"
    ):
        consolidate(broken, workdir / "never")
    assert not (workdir / "never").exists()

    # OUT_DIR is replaced as a whole: a directory of other files is refused and kept, as convert does
    (workdir / "notes" / "sub").mkdir(parents=True)
    (workdir / "notes" / "sub" / "important.txt").write_text("keep")
    with pytest.raises(
        CheckpointError, match=r"refusing to replace OUT_DIR .*notes: it is a directory that holds"
    ):
        consolidate(workdir / "shards-4", workdir / "notes")
    assert (workdir / "notes" / "sub" / "important.txt").read_text() == "keep"


def edit(path: Path, key: str, change) -> None:
    """Change one tensor of a shard file, keeping its metadata."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(path, "pt") as f:
        metadata = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    change(tensors[key])
    save_file(tensors, path, metadata=metadata)


def test_world_4_biases_tied_embeddings_uneven_vocabulary(workdir):
    source = workdir / "source-variants"
    model = tiny.causal_lm("qwen2", vocab_size=130, tie_word_embeddings=True)
    tiny.save(model, source)
    ids = tiny.token_ids(vocab=130)
    with torch.no_grad():
        logits = model(ids).logits
    generated = model.generate(ids[:1], max_new_tokens=10, do_sample=False, min_new_tokens=10)
    model.train()
    model(ids, labels=ids).loss.backward()
    ranks = tp_scenarios.spawn("variants", 4, workdir, source=str(source), ids=ids)
    for rank, out in enumerate(ranks):
        assert out["tied"]
        assert out["embed"] == ((33, 64) if rank < 3 else (31, 64))  # 130 rows cut 33/33/33/31, not padded
        assert out["qkv_bias"] == (48,)  # [q_r | k_r | v_r] biases, kv replicated like the weights
        torch.testing.assert_close(out["logits"], logits, atol=1e-5, rtol=0)
        assert torch.equal(out["generated"], generated)
        assert out["grid_embed"] == (65, 64)  # tp_size=2 on 4 ranks: two tensor-parallel pairs
        torch.testing.assert_close(out["grid_logits"], logits, atol=1e-5, rtol=0)
    for key, param in model.named_parameters():
        torch.testing.assert_close(ranks[0]["grads"][key], param.grad, atol=2e-6, rtol=1e-4, msg=key)
    assert same_files(source, workdir / "saved-variants") == ["model.safetensors"]
    consolidate(workdir / "shards-variants", workdir / "consolidated-variants", progress=False)
    assert same_files(source, workdir / "consolidated-variants") == ["model.safetensors"]
