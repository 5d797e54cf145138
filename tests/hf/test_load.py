"""splice.from_pretrained / save_pretrained against checkpoints written by transformers itself."""

from __future__ import annotations

import filecmp
import json
import threading
from pathlib import Path

import pytest
import tiny
import torch
import transformers as T

import splice
from splice.checkpoint import CheckpointReader, load_state_dict
from splice.errors import CheckpointError, LoadError
from splice.fusion import get_state
from splice.fusion.linear import LinearSlice
from splice.transforms import bitwise_equal

FUSED = {"qkv": True, "gate_up": True}


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return tiny.save(tiny.causal_lm("llama"), tmp_path_factory.mktemp("llama"))


@pytest.fixture(scope="module")
def llama_sharded_dir(tmp_path_factory):
    path = tiny.save(tiny.causal_lm("llama", seed=1), tmp_path_factory.mktemp("plain"))
    loaded = T.AutoModelForCausalLM.from_pretrained(path)  # a loaded model saves in sorted key order
    return tiny.save(loaded, tmp_path_factory.mktemp("sharded"), max_shard_size="60KB")


@pytest.fixture(scope="module")
def qwen2_vl_dir(tmp_path_factory):
    return tiny.save(tiny.qwen2_vl(), tmp_path_factory.mktemp("qwen2vl"))


def logits(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits


def same_files(a: Path, b: Path) -> list[str]:
    names = sorted(p.name for p in a.iterdir())
    assert names == sorted(p.name for p in b.iterdir())
    return [n for n in names if not filecmp.cmp(a / n, b / n, shallow=False)]


@pytest.mark.parametrize("cls", [T.AutoModelForCausalLM, T.LlamaForCausalLM])
def test_load_fused_matches_transformers_and_saves_back_byte_identical(llama_dir, tmp_path, cls):
    plain = T.AutoModelForCausalLM.from_pretrained(llama_dir)
    model = splice.from_pretrained(cls, llama_dir, fusion_config=FUSED)
    attn = model.model.layers[0].self_attn
    assert isinstance(attn.q_proj, LinearSlice) and attn.qkv_proj.weight.shape == (128, 64)
    ids = {"input_ids": tiny.token_ids()}
    torch.testing.assert_close(logits(model, ids), logits(plain, ids), rtol=0, atol=1e-5)
    prompt = ids["input_ids"][:1, :4]
    kwargs = dict(max_new_tokens=20, min_new_tokens=20, do_sample=False)
    assert torch.equal(model.generate(prompt, **kwargs), plain.generate(prompt, **kwargs))
    assert not model.training
    out = splice.save_pretrained(model, tmp_path / "out")
    assert same_files(llama_dir, out) == []  # config.json, generation_config.json, model.safetensors


def test_gate_up_maps_the_file_when_gate_and_up_are_stored_back_to_back(llama_dir):
    """safetensors sorts by name, so gate_proj sits right before up_proj: the fused tensor is a mapping."""
    with CheckpointReader(llama_dir) as reader:
        before = reader.bytes_mapped
        assert (
            reader.map_adjacent(["model.layers.0.mlp.gate_proj.weight", "model.layers.0.mlp.up_proj.weight"])
            is not None
        )
        assert reader.bytes_mapped > before
    original = (llama_dir / "model.safetensors").read_bytes()
    model = splice.from_pretrained(T.AutoModelForCausalLM, llama_dir, fusion_config=FUSED)
    weights = load_state_dict(llama_dir)
    mlp, attn = model.model.layers[0].mlp, model.model.layers[0].self_attn
    gate_up = mlp.gate_up_proj.weight
    embed = model.model.embed_tokens.weight  # only renamed: mapped, as transformers does
    assert gate_up.untyped_storage().data_ptr() == embed.untyped_storage().data_ptr()  # the same file mapping
    assert (
        attn.qkv_proj.weight.untyped_storage().data_ptr() != embed.untyped_storage().data_ptr()
    )  # k, o, q, v: copied
    assert bitwise_equal(
        gate_up,
        torch.cat(
            [weights["model.layers.0.mlp.gate_proj.weight"], weights["model.layers.0.mlp.up_proj.weight"]]
        ),
    )
    loaded = gate_up.detach().clone()
    model.train()
    model(tiny.token_ids(), labels=tiny.token_ids()).loss.backward()
    torch.optim.SGD(model.parameters(), lr=0.1).step()  # in place on the mapped pages: copy-on-write
    assert not torch.equal(mlp.gate_up_proj.weight, loaded)
    assert (llama_dir / "model.safetensors").read_bytes() == original


def test_sharded_checkpoint_round_trip(llama_sharded_dir, tmp_path):
    assert len(list(llama_sharded_dir.glob("model-*.safetensors"))) >= 3
    model = splice.from_pretrained(T.AutoModelForCausalLM, llama_sharded_dir, fusion_config=FUSED)
    plain = T.AutoModelForCausalLM.from_pretrained(llama_sharded_dir)
    ids = {"input_ids": tiny.token_ids()}
    torch.testing.assert_close(logits(model, ids), logits(plain, ids), rtol=0, atol=1e-5)
    out = splice.save_pretrained(model, tmp_path / "out", max_shard_size="60KB")
    assert same_files(llama_sharded_dir, out) == []


def test_a_split_greedy_planning_would_not_reproduce_comes_back_byte_identical(tmp_path):
    """A fresh model saves its shards in module order; splice remembers each tensor's file."""
    path = tiny.save(tiny.causal_lm("llama", seed=3), tmp_path / "fresh", max_shard_size="60KB")
    model = splice.from_pretrained(T.AutoModelForCausalLM, path, fusion_config=FUSED)
    assert same_files(path, splice.save_pretrained(model, tmp_path / "out")) == []


def test_tied_embeddings(tmp_path):
    path = tiny.save(tiny.causal_lm("llama", tie_word_embeddings=True), tmp_path / "tied")
    model = splice.from_pretrained(T.AutoModelForCausalLM, path, fusion_config=FUSED)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    plain = T.AutoModelForCausalLM.from_pretrained(path)
    ids = {"input_ids": tiny.token_ids()}
    torch.testing.assert_close(logits(model, ids), logits(plain, ids), rtol=0, atol=1e-5)
    assert same_files(path, splice.save_pretrained(model, tmp_path / "out")) == []


@pytest.mark.parametrize("kind", ["mistral", "qwen2", "qwen3", "gemma"])
def test_other_architectures_load_fused(kind, tmp_path):
    path = tiny.save(tiny.causal_lm(kind), tmp_path / kind)
    model = splice.from_pretrained(T.AutoModelForCausalLM, path, fusion_config=["qkv", "gate_up", "norm_mlp"])
    plain = T.AutoModelForCausalLM.from_pretrained(path)
    ids = {"input_ids": tiny.token_ids()}
    torch.testing.assert_close(logits(model, ids), logits(plain, ids), rtol=0, atol=1e-5)
    assert same_files(path, splice.save_pretrained(model, tmp_path / "out")) == []


@pytest.mark.parametrize("kind", ["mixtral", "qwen2_moe", "qwen3_moe"])
def test_moe_checkpoints_with_per_expert_tensors(kind, tmp_path):
    """transformers stacks per-expert tensors while loading (MergeModulelist + Concatenate); so does splice."""
    path = tiny.save(tiny.causal_lm(kind), tmp_path / kind, max_shard_size="150KB")
    checkpoint = load_state_dict(path)
    experts = [k for k in checkpoint if ".experts.3." in k]
    assert experts and len(list(path.glob("model-*.safetensors"))) > 1  # per-expert keys, several files
    plain = T.AutoModelForCausalLM.from_pretrained(path)
    model = splice.from_pretrained(T.AutoModelForCausalLM, path, fusion_config=["qkv"])
    runtime = dict(model.named_parameters())
    for name, param in plain.named_parameters():  # the stacked [E, 2 * inter, hidden] tensors, bitwise
        if ".experts." in name:
            assert bitwise_equal(runtime[name], param), name
    ids = {"input_ids": tiny.token_ids()}
    torch.testing.assert_close(logits(model, ids), logits(plain, ids), rtol=0, atol=1e-5)
    assert same_files(path, splice.save_pretrained(model, tmp_path / "out")) == []


@pytest.mark.parametrize(
    "dropped, message",
    [
        (
            "model.layers.1.block_sparse_moe.experts.4.w3.weight",
            r"model.layers.1.mlp.experts.gate_up_proj: expert 4 has no '.experts.\*.w3.weight' tensor",
        ),
        (
            "model.layers.0.block_sparse_moe.experts.2.w2.weight",
            r"indices \[2\] are missing among model.layers.0.block_sparse_moe.experts.2.w2.weight",
        ),
    ],
)
def test_moe_checkpoint_missing_an_expert_tensor_is_an_error_naming_it(tmp_path, dropped, message):
    path = tiny.save(tiny.causal_lm("mixtral"), tmp_path / "mixtral")
    bad = copy_checkpoint(path, tmp_path / "bad", lambda sd: sd.pop(dropped))
    with pytest.raises(LoadError, match=message):
        splice.from_pretrained(T.AutoModelForCausalLM, bad)


def test_phi3_qkv_split(tmp_path):
    path = tiny.save(tiny.causal_lm("phi3"), tmp_path / "phi3")
    model = splice.from_pretrained(T.AutoModelForCausalLM, path, fusion_config=["qkv_split"])
    attn = model.model.layers[0].self_attn
    assert [type(getattr(attn, n)).__name__ for n in ("q_proj", "k_proj", "v_proj")] == ["Linear"] * 3
    assert attn.k_proj.out_features == 32  # GQA sizes from the head counts
    plain = T.AutoModelForCausalLM.from_pretrained(path)
    ids = {"input_ids": tiny.token_ids()}
    torch.testing.assert_close(logits(model, ids), logits(plain, ids), rtol=0, atol=1e-5)
    assert same_files(path, splice.save_pretrained(model, tmp_path / "out")) == []


def test_qwen2_vl_patch_embeddings_the_three_transformers_bugs(qwen2_vl_dir, tmp_path):
    """transformers 5.23: random linear_proj, a leak into later loads, the fused key written on save."""
    keys = CheckpointReader(qwen2_vl_dir).keys()
    assert "visual.patch_embed.proj.weight" in keys  # the checkpoint says visual., the model model.visual.

    model = splice.from_pretrained(
        T.Qwen2VLForConditionalGeneration, qwen2_vl_dir, fusion_config={"patch_embeddings": True, "qkv": True}
    )
    plain = T.Qwen2VLForConditionalGeneration.from_pretrained(qwen2_vl_dir)
    inputs = tiny.qwen2_vl_inputs()
    torch.testing.assert_close(logits(model, inputs), logits(plain, inputs), rtol=0, atol=1e-5)
    conv = plain.model.visual.patch_embed.proj.weight
    linear = model.model.visual.patch_embed.linear_proj.weight
    assert bitwise_equal(linear.detach(), conv.detach().reshape(conv.shape[0], -1))  # loaded, not random

    again = T.Qwen2VLForConditionalGeneration.from_pretrained(qwen2_vl_dir)
    assert type(again.model.visual.patch_embed.proj) is torch.nn.Conv3d  # nothing leaked into later loads

    out = splice.save_pretrained(model, tmp_path / "out")
    saved = CheckpointReader(out)
    assert "visual.patch_embed.proj.weight" in saved and saved.meta(
        "visual.patch_embed.proj.weight"
    ).shape == (32, 3, 2, 4, 4)
    assert not any("linear_proj" in k or "qkv_proj" in k for k in saved.keys())
    assert filecmp.cmp(qwen2_vl_dir / "model.safetensors", out / "model.safetensors", shallow=False)


def test_runtime_layout_save_records_fusion_config_and_reloads(llama_dir, tmp_path):
    model = splice.from_pretrained(T.AutoModelForCausalLM, llama_dir, fusion_config=FUSED)
    out = splice.save_pretrained(model, tmp_path / "runtime", save_original_format=False)
    config = json.loads((out / "config.json").read_text())
    assert config["fusion_config"] == {"qkv": True, "gate_up": True}
    assert "model.layers.0.self_attn.qkv_proj.weight" in CheckpointReader(out)
    assert "fusion_config" not in json.loads((llama_dir / "config.json").read_text())

    reloaded = splice.from_pretrained(T.AutoModelForCausalLM, out)  # reuses the stored fusion_config
    assert get_state(reloaded).config == {"qkv": True, "gate_up": True}
    assert not hasattr(reloaded.config, "fusion_config")  # the fusion lives in splice's state, not the config
    ids = {"input_ids": tiny.token_ids()}
    torch.testing.assert_close(logits(reloaded, ids), logits(model, ids), rtol=0, atol=0)

    other = splice.from_pretrained(T.AutoModelForCausalLM, out, fusion_config={"gate_up": True})  # re-layout
    assert isinstance(other.model.layers[0].self_attn.q_proj, torch.nn.Linear)
    torch.testing.assert_close(logits(other, ids), logits(model, ids), rtol=0, atol=1e-5)
    unfused = splice.from_pretrained(T.AutoModelForCausalLM, out, fusion_config={})
    assert get_state(unfused) is None
    back = splice.save_pretrained(unfused, tmp_path / "back")
    assert same_files(llama_dir, back) == []


def test_bf16_load_matches_transformers_bf16(llama_dir):
    model = splice.from_pretrained(
        T.AutoModelForCausalLM, llama_dir, fusion_config=FUSED, dtype=torch.bfloat16
    )
    plain = T.AutoModelForCausalLM.from_pretrained(llama_dir, dtype=torch.bfloat16)
    assert model.model.layers[0].self_attn.qkv_proj.weight.dtype == torch.bfloat16
    ids = {"input_ids": tiny.token_ids()}
    torch.testing.assert_close(logits(model, ids), logits(plain, ids), rtol=0, atol=0)


def copy_checkpoint(src: Path, dst: Path, edit) -> Path:
    from splice.checkpoint import save_state_dict

    sd = load_state_dict(src)
    edit(sd)
    save_state_dict(sd, dst, metadata={"format": "pt"})  # replaces dst as a whole, so configs come after
    for name in ("config.json", "generation_config.json"):
        (dst / name).write_bytes((src / name).read_bytes())
    return dst


def test_a_missing_weight_is_an_error_naming_it(llama_dir, tmp_path):
    path = copy_checkpoint(
        llama_dir, tmp_path / "c", lambda sd: sd.pop("model.layers.1.mlp.down_proj.weight")
    )
    with pytest.raises(
        LoadError, match=r"no weight for 1 model key\(s\): model.layers.1.mlp.down_proj.weight; refusing"
    ):
        splice.from_pretrained(T.AutoModelForCausalLM, path, fusion_config=FUSED)


def test_a_missing_member_of_a_fused_group_is_an_error_naming_it(llama_dir, tmp_path):
    path = copy_checkpoint(
        llama_dir, tmp_path / "c", lambda sd: sd.pop("model.layers.0.self_attn.v_proj.weight")
    )
    with pytest.raises(
        LoadError,
        match=r"does not fit the requested layout: .*but not model.layers.0.self_attn.v_proj.weight",
    ):
        splice.from_pretrained(T.AutoModelForCausalLM, path, fusion_config=FUSED)


def test_a_misshapen_weight_is_an_error_naming_it(llama_dir, tmp_path):
    def edit(sd):
        sd["model.layers.1.self_attn.o_proj.weight"] = torch.zeros(64, 60)

    path = copy_checkpoint(llama_dir, tmp_path / "c", edit)
    with pytest.raises(
        LoadError,
        match=r"model.layers.1.self_attn.o_proj.weight has shape \[64, 60\] in the checkpoint .* model expects \[64, 64\]",
    ):
        splice.from_pretrained(T.AutoModelForCausalLM, path, fusion_config=FUSED)


def test_a_fused_group_that_does_not_fit_is_an_error(llama_dir, tmp_path):
    def edit(sd):
        sd["model.layers.0.self_attn.k_proj.weight"] = torch.zeros(32, 60)

    path = copy_checkpoint(llama_dir, tmp_path / "c", edit)
    with pytest.raises(
        LoadError, match=r"model.layers.0.self_attn.\{q,k,v\}_proj.weight.*must agree on every dim except 0"
    ):
        splice.from_pretrained(T.AutoModelForCausalLM, path, fusion_config=FUSED)


def test_a_corrupt_file_is_an_error_naming_it(llama_dir, tmp_path):
    path = copy_checkpoint(llama_dir, tmp_path / "c", lambda sd: None)
    data = (path / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(data[:100])
    with pytest.raises(CheckpointError, match="model.safetensors"):
        splice.from_pretrained(T.AutoModelForCausalLM, path, fusion_config=FUSED)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"fusion_config": ["qkvv"]}, "unknown fusion family 'qkvv'"),
        ({"fusion_config": {"qkv": {"modules": "nothing"}}}, "matched no module"),
        ({"device_map": "auto"}, "device_map='auto' is not supported"),
        ({"quantization_config": object()}, "does not support quantization_config"),
        ({"num_hidden_layerz": 3}, r"unknown keyword argument\(s\) \['num_hidden_layerz'\]"),
    ],
)
def test_bad_arguments(llama_dir, kwargs, message):
    with pytest.raises(splice.SpliceError, match=message):
        splice.from_pretrained(T.AutoModelForCausalLM, llama_dir, **kwargs)


def test_missing_directory_is_a_clear_error(tmp_path):
    with pytest.raises(LoadError, match="not a local directory and not downloadable"):
        splice.from_pretrained(T.AutoModelForCausalLM, str(tmp_path / "nope"), local_files_only=True)


def test_config_kwargs_override_like_transformers(llama_dir):
    model = splice.from_pretrained(
        T.AutoModelForCausalLM, llama_dir, fusion_config=FUSED, attn_implementation="eager", rms_norm_eps=1e-3
    )
    assert model.config._attn_implementation == "eager" and model.config.rms_norm_eps == 1e-3


def test_no_global_state_leaks(llama_dir):
    from transformers import conversion_mapping, monkey_patching

    patches = dict(monkey_patching.get_patch_mapping())
    mappings = dict(conversion_mapping._checkpoint_conversion_mapping_cache or {})
    dtype = torch.get_default_dtype()
    splice.from_pretrained(T.AutoModelForCausalLM, llama_dir, fusion_config=FUSED, dtype=torch.bfloat16)
    plain = T.AutoModelForCausalLM.from_pretrained(llama_dir)
    assert type(plain.model.layers[0].self_attn.q_proj) is torch.nn.Linear and get_state(plain) is None
    assert dict(monkey_patching.get_patch_mapping()) == patches
    assert dict(conversion_mapping._checkpoint_conversion_mapping_cache or {}) == mappings
    assert torch.get_default_dtype() == dtype


def test_two_threads_load_differently_fused_models_at_once(llama_dir):
    configs = [{"qkv": True}, {"gate_up": True, "norm_mlp": True}, {}]
    results: dict[int, object] = {}

    def load(i):
        try:
            results[i] = splice.from_pretrained(T.AutoModelForCausalLM, llama_dir, fusion_config=configs[i])
        except Exception as exc:  # pragma: no cover - reported by the assert below
            results[i] = exc

    threads = [threading.Thread(target=load, args=(i,)) for i in range(len(configs))]
    [t.start() for t in threads]
    [t.join() for t in threads]
    plain = T.AutoModelForCausalLM.from_pretrained(llama_dir)
    ids = {"input_ids": tiny.token_ids()}
    for i, config in enumerate(configs):
        model = results[i]
        assert not isinstance(model, Exception), model
        state = get_state(model)
        assert (state.config if state else {}) == config
        torch.testing.assert_close(logits(model, ids), logits(plain, ids), rtol=0, atol=1e-5)


def test_an_interrupted_save_leaves_the_previous_checkpoint_whole(llama_dir, tmp_path, monkeypatch):
    from splice.checkpoint import CheckpointWriter

    model = splice.from_pretrained(T.AutoModelForCausalLM, llama_dir, fusion_config=FUSED)
    out = splice.save_pretrained(model, tmp_path / "out")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    written = []

    def failing_write(self, key, tensor):
        written.append(key)
        if len(written) == 5:
            raise KeyboardInterrupt("simulated interrupt")
        return original(self, key, tensor)

    original = CheckpointWriter.write
    monkeypatch.setattr(CheckpointWriter, "write", failing_write)
    with torch.no_grad():
        model.model.layers[0].self_attn.qkv_proj.weight.add_(1.0)
    with pytest.raises(KeyboardInterrupt):
        splice.save_pretrained(model, out)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no staging directory left behind


def test_save_keeps_other_files_and_drops_stale_weights(llama_dir, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "tokenizer.json").write_text("{}")
    (out / "model-00001-of-00002.safetensors").write_bytes(b"stale")
    (out / "model.safetensors.index.json").write_text("{}")
    model = splice.from_pretrained(T.AutoModelForCausalLM, llama_dir, fusion_config=FUSED)
    splice.save_pretrained(model, out)
    assert sorted(p.name for p in out.iterdir()) == [
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "tokenizer.json",
    ]


@pytest.mark.parametrize("given", ["fused", "original"])
def test_a_state_dict_passed_to_save_is_written_in_the_original_layout(llama_dir, tmp_path, given):
    """Trainer and accelerate pass the model's (fused) state dict; it is converted as the model's own is."""
    model = splice.from_pretrained(T.AutoModelForCausalLM, llama_dir, fusion_config=FUSED)
    state_dict = model.state_dict() if given == "fused" else splice.original_state_dict(model)
    splice.save_pretrained(model, tmp_path / "saved", state_dict=state_dict)
    assert same_files(llama_dir, tmp_path / "saved") == []  # config.json, generation_config.json, weights
