"""FSDP2 (fully_shard) and DCP on a fused model, end to end: gloo on CPU, world 2, a tiny GQA Llama.

One spawn runs everything (fsdp_scenarios.py); this file checks what the ranks saw against one process:
the unfused model (losses, trained weights), its checkpoint (loads, exports) and splice's own save.
"""

from __future__ import annotations

import copy
import dataclasses
import filecmp
import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import fsdp_scenarios
import pytest
import tiny
import torch
import torch.distributed.checkpoint as dcp
import transformers
from safetensors.torch import load_file
from torch.distributed.checkpoint import FileSystemReader

import splice
from splice import cli
from splice.parallel.dcp_consolidate import consolidate_dcp

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

    reference.update(train(model))
    return workdir, ranks, reference


def train(model) -> dict:
    """The single-process, unfused run the ranks must reproduce: the whole batch, the same steps."""
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=fsdp_scenarios.LR)
    losses = []
    for _ in range(fsdp_scenarios.STEPS):
        loss = model(IDS, labels=IDS).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.detach())
    return {"losses": torch.stack(losses), "trained": {k: v.clone() for k, v in model.state_dict().items()}}


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
    same_files(workdir / "saved-full-state-dict", workdir / "reference-saved")


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
        assert out["norm_mlp_view"] == out["view_keys"]


def test_training_matches_one_unfused_process(run):
    workdir, ranks, ref = run
    for out in ranks:
        torch.testing.assert_close(out["losses"], ref["losses"], atol=1e-5, rtol=0)
        assert out["resumed_equal"]
    trained = tensors(workdir / "trained")
    assert sorted(trained) == sorted(ref["trained"])
    for key, value in ref["trained"].items():
        torch.testing.assert_close(trained[key], value, atol=1e-5, rtol=0, msg=key)


def test_fsdp2_over_splice_tensor_parallel_on_a_2d_mesh(tmp_path):
    """World 4 = dp 2 x tp 2: FSDP2 shards splice's TP-sharded fused model along dp."""
    model = tiny.causal_lm(
        "llama", attention_bias=True, intermediate_size=72
    )  # 2 kv heads: tp 2 divides them
    source = tiny.save(model, tmp_path / "source")
    ranks = fsdp_scenarios.spawn("two_d", 4, tmp_path, source=str(source), ids=IDS)
    with torch.no_grad():
        logits = model(IDS).logits
    reference = train(model)
    for out in ranks:
        assert out["placements"] == ["_S(0, 2)", "S(0)"]  # FSDP2's dp shard within splice's tp shard
        torch.testing.assert_close(out["logits"], logits, atol=1e-5, rtol=0)
        torch.testing.assert_close(out["losses"], reference["losses"], atol=1e-5, rtol=0)
    trained = tensors(tmp_path / "trained-2d")
    assert sorted(trained) == sorted(reference["trained"])
    for key, value in reference["trained"].items():
        torch.testing.assert_close(trained[key], value, atol=1e-5, rtol=0, msg=key)
    # the view undoes splice's TP layout and FSDP2's shard per rank: about a quarter of the bytes each (norms
    # and o_proj's bias are replicated over tp, and DCP writes each replicated chunk once)
    checkpoint = sum(v.numel() * v.element_size() for v in trained.values())
    assert max(out["view_local_bytes"] for out in ranks) <= 0.26 * checkpoint
    written = tensors(tmp_path / "hf-writer-2d")
    assert sorted(written) == sorted(trained)
    assert [k for k, v in trained.items() if not torch.equal(written[k], v)] == []


# --------------------------------------------------------------------------------------------------
# splice consolidate DCP_DIR OUT_DIR --config DIR


def consolidate_cli(*args: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "splice.cli", "consolidate", *map(str, args)], capture_output=True, text=True
    )


def left_behind(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if "tmp" in p.name or p.name.startswith("."))


def test_consolidate_dcp_is_byte_identical_to_save_pretrained(run):
    workdir, _, _ = run
    report = consolidate_dcp(workdir / "dcp", workdir / "consolidated", workdir / "trained-runtime")
    assert report.files == ["model.safetensors"] and report.tensors == len(tensors(workdir / "trained"))
    same_files(workdir / "consolidated", workdir / "trained")
    done = consolidate_cli(
        workdir / "dcp", workdir / "consolidated-cli", "--config", workdir / "trained-runtime"
    )
    assert done.returncode == 0, done.stderr
    same_files(workdir / "consolidated-cli", workdir / "trained")


def test_consolidate_dcp_of_one_process(tmp_path):
    """Any world size: a DCP checkpoint written without a process group consolidates the same way."""
    model = tiny.causal_lm("llama", **CONFIG)
    splice.fuse(model, fsdp_scenarios.FUSION)
    dcp.save(model.state_dict(), checkpoint_id=str(tmp_path / "dcp"))
    splice.save_pretrained(model, tmp_path / "runtime", save_original_format=False)
    splice.save_pretrained(model, tmp_path / "saved")
    consolidate_dcp(tmp_path / "dcp", tmp_path / "out", tmp_path / "runtime")
    same_files(tmp_path / "out", tmp_path / "saved")


def test_consolidate_dcp_errors(run, tmp_path, capsys):
    workdir, _, _ = run
    dcp_dir, config = workdir / "dcp", workdir / "trained-runtime"

    def refused(dcp_dir: Path, config: Path | None) -> str:
        out = tmp_path / "out"
        args = [str(dcp_dir), str(out)] + ([] if config is None else ["--config", str(config)])
        assert cli.main(["consolidate", *args]) == 2
        captured = capsys.readouterr()
        assert captured.out == ""
        assert not out.exists() and left_behind(tmp_path) == []
        return captured.err.strip()

    assert refused(dcp_dir, None) == (
        f"splice consolidate: error: {dcp_dir} is a torch.distributed.checkpoint directory: pass --config DIR, "
        "a directory whose config.json records the fusion (splice.save_pretrained(model, DIR, save_original_format=False))"
    )
    assert refused(dcp_dir, workdir / "source") == (
        f"splice consolidate: error: {workdir / 'source' / 'config.json'}: records no fusion_config, so which "
        "tensors were fused is unknown; pass the directory splice.save_pretrained(model, DIR, "
        "save_original_format=False) wrote"
    )

    other = tmp_path / "other-config"
    shutil.copytree(config, other)
    document = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**document, "intermediate_size": 80}))
    message = refused(dcp_dir, other)
    assert message.startswith(
        f"splice consolidate: error: {dcp_dir} does not match the model of {other}: shapes differ"
    )
    assert "model.layers.0.mlp.gate_up_proj.weight: (144, 64) != (160, 64)" in message

    missing = tmp_path / "missing-shard"
    shutil.copytree(dcp_dir, missing)
    (missing / "__1_0.distcp").unlink()
    assert refused(missing, config).startswith(
        f"splice consolidate: error: {missing}: __1_0.distcp is missing (it holds part of "
    )

    # hostile metadata: a file name that leaves the directory, and a pickle naming a callable
    escape = tmp_path / "escape"
    shutil.copytree(dcp_dir, escape)
    metadata = FileSystemReader(str(escape)).read_metadata()
    index = next(iter(metadata.storage_data))
    metadata.storage_data[index] = dataclasses.replace(
        metadata.storage_data[index], relative_path="../x.distcp"
    )
    (escape / ".metadata").write_bytes(pickle.dumps(metadata))
    assert refused(escape, config) == (
        f"splice consolidate: error: {escape / '.metadata'}: {index.fqn} names the file '../x.distcp', "
        f"which is not a plain name in {escape}"
    )
    far = dataclasses.replace(metadata.storage_data[index], relative_path="__0_0.distcp", offset=1 << 40)
    metadata.storage_data[index] = far
    (escape / ".metadata").write_bytes(pickle.dumps(metadata))
    size = (escape / "__0_0.distcp").stat().st_size
    assert refused(escape, config) == (
        f"splice consolidate: error: {escape / '__0_0.distcp'}: {index.fqn} is said to lie at bytes "
        f"[{1 << 40}, {(1 << 40) + far.length}) of a {size}-byte file"
    )
    (escape / ".metadata").write_bytes(pickle.dumps(os.system))
    assert refused(escape, config) == (
        f"splice consolidate: error: {escape / '.metadata'}: names posix.system, which DCP metadata never holds; "
        "refusing to load it"
    )
