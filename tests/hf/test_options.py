"""from_pretrained keywords as transformers has them: state_dict=, output_loading_info=, the meta device, error types."""

from __future__ import annotations

import filecmp
from pathlib import Path

import pytest
import tiny
import torch
import transformers as T

import splice
from splice.checkpoint import load_state_dict, save_state_dict
from splice.errors import LoadError, MetaDeviceError, WeightsMismatchError

FUSED = {"qkv": True, "gate_up": True}


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return tiny.save(tiny.causal_lm("llama"), tmp_path_factory.mktemp("llama"))


def edited_checkpoint(src: Path, dst: Path, edit) -> Path:
    sd = load_state_dict(src)
    edit(sd)
    save_state_dict(sd, dst, metadata={"format": "pt"})
    for name in ("config.json", "generation_config.json"):
        (dst / name).write_bytes((src / name).read_bytes())
    return dst


# -- state_dict= -------------------------------------------------------------------------------------


@pytest.mark.parametrize("cls", [T.AutoModelForCausalLM, T.LlamaForCausalLM])
def test_a_state_dict_loads_fused_like_the_checkpoint_it_came_from(llama_dir, tmp_path, cls):
    plain = T.AutoModelForCausalLM.from_pretrained(llama_dir)
    given = plain.state_dict()
    model = splice.from_pretrained(cls, None, config=plain.config, state_dict=given, fusion_config=FUSED)
    assert model.model.layers[0].self_attn.qkv_proj.weight.shape == (128, 64)
    torch.testing.assert_close(tiny.logits(model), tiny.logits(plain), rtol=0, atol=0)
    assert model.generation_config.bos_token_id == plain.config.bos_token_id
    splice.save_pretrained(model, tmp_path / "out")
    assert filecmp.cmp(llama_dir / "model.safetensors", tmp_path / "out" / "model.safetensors", shallow=False)
    # the model owns its weights: training it does not write into the dict it was given
    before = given["model.embed_tokens.weight"].clone()
    with torch.no_grad():
        model.model.embed_tokens.weight.add_(1)
    assert torch.equal(given["model.embed_tokens.weight"], before)


def test_a_state_dict_is_checked_as_strictly_as_a_checkpoint(llama_dir):
    plain = T.AutoModelForCausalLM.from_pretrained(llama_dir)
    given = plain.state_dict()
    del given["model.layers.1.mlp.up_proj.weight"]
    with pytest.raises(
        WeightsMismatchError,
        match=r"^state_dict=: the checkpoint does not fit .*model.layers.1.mlp.up_proj.weight",
    ):
        splice.from_pretrained(
            T.LlamaForCausalLM, None, config=plain.config, state_dict=given, fusion_config=FUSED
        )
    given = plain.state_dict()
    given["model.norm.weight"] = torch.ones(60)
    with pytest.raises(RuntimeError, match=r"model.norm.weight has shape \[60\] .* model expects \[64\]"):
        splice.from_pretrained(T.LlamaForCausalLM, None, config=plain.config, state_dict=given)


@pytest.mark.parametrize(
    "path, kwargs, message",
    [
        (
            "DIR",
            {"state_dict": {}},
            r"^`state_dict` cannot be passed together with a model name or a `gguf_file`",
        ),
        (None, {"state_dict": {}}, r"^state_dict= needs config= \(a PretrainedConfig\)"),
        (
            None,
            {},
            r"^pretrained_model_name_or_path is None: pass a checkpoint directory .* or state_dict= with config=",
        ),
        (
            None,
            {"state_dict": {"a": 1}, "config": "CONFIG"},
            r"^state_dict= must map names to tensors; 'a' holds a int",
        ),
        (
            None,
            {"state_dict": [1], "config": "CONFIG"},
            r"^state_dict= must be a mapping of names to tensors, got list",
        ),
    ],
)
def test_state_dict_and_path_errors(llama_dir, path, kwargs, message):
    kwargs = {k: T.AutoConfig.from_pretrained(llama_dir) if v == "CONFIG" else v for k, v in kwargs.items()}
    with pytest.raises(LoadError, match=message):
        splice.from_pretrained(T.LlamaForCausalLM, llama_dir if path == "DIR" else path, **kwargs)


def test_transformers_refuses_a_state_dict_with_a_path_in_the_same_words(llama_dir):
    with pytest.raises(ValueError) as theirs:
        T.LlamaForCausalLM.from_pretrained(llama_dir, state_dict={"a": torch.zeros(1)})
    with pytest.raises(LoadError) as ours:
        splice.from_pretrained(T.LlamaForCausalLM, llama_dir, state_dict={"a": torch.zeros(1)})
    assert str(ours.value) == str(theirs.value)


# -- the meta device ---------------------------------------------------------------------------------


def test_a_meta_device_context_is_refused_as_transformers_refuses_it(llama_dir):
    with torch.device("meta"), pytest.raises(RuntimeError) as theirs:
        T.AutoModelForCausalLM.from_pretrained(llama_dir)
    with torch.device("meta"), pytest.raises(MetaDeviceError) as ours:
        splice.from_pretrained(T.AutoModelForCausalLM, llama_dir, fusion_config=FUSED)
    assert isinstance(ours.value, RuntimeError) and isinstance(ours.value, splice.SpliceError)
    assert str(ours.value) == str(theirs.value)
    # outside the context it loads, and the refusal left no state behind
    assert splice.from_pretrained(T.AutoModelForCausalLM, llama_dir).device.type == "cpu"


# -- error types: catchable as transformers' ---------------------------------------------------------


def test_a_size_mismatch_is_a_runtime_error_as_in_transformers(llama_dir, tmp_path):
    path = edited_checkpoint(
        llama_dir,
        tmp_path / "c",
        lambda sd: sd.update({"model.layers.1.self_attn.o_proj.weight": torch.zeros(64, 60)}),
    )
    with pytest.raises(RuntimeError):
        T.AutoModelForCausalLM.from_pretrained(path)
    try:
        splice.from_pretrained(T.AutoModelForCausalLM, path, fusion_config=FUSED)
    except RuntimeError as exc:  # what code written for transformers catches
        assert isinstance(exc, WeightsMismatchError) and isinstance(exc, ValueError)
        assert "model.layers.1.self_attn.o_proj.weight has shape [64, 60]" in str(exc)
    else:
        raise AssertionError("no error")


def test_a_missing_weight_is_a_runtime_error_as_in_a_strict_torch_load(llama_dir, tmp_path):
    path = edited_checkpoint(llama_dir, tmp_path / "c", lambda sd: sd.pop("model.norm.weight"))
    model = T.AutoModelForCausalLM.from_pretrained(llama_dir)
    with pytest.raises(RuntimeError, match="Missing key"):
        model.load_state_dict(load_state_dict(path), strict=True)
    with pytest.raises(RuntimeError, match=r"no weight for 1 model key\(s\): model.norm.weight"):
        splice.from_pretrained(T.AutoModelForCausalLM, path)


# -- output_loading_info= ----------------------------------------------------------------------------


def test_output_loading_info_returns_the_dict_transformers_returns(llama_dir, tmp_path):
    _, theirs = T.AutoModelForCausalLM.from_pretrained(llama_dir, output_loading_info=True)
    model, ours = splice.from_pretrained(
        T.AutoModelForCausalLM, llama_dir, fusion_config=FUSED, output_loading_info=True
    )
    assert isinstance(model, T.LlamaForCausalLM)
    assert (
        ours
        == theirs
        == {"missing_keys": set(), "unexpected_keys": set(), "mismatched_keys": set(), "error_msgs": []}
    )
    # a checkpoint key the model has no place for is skipped, and reported, by both
    path = edited_checkpoint(
        llama_dir, tmp_path / "c", lambda sd: sd.update({"model.extra.weight": torch.ones(3)})
    )
    _, theirs = T.AutoModelForCausalLM.from_pretrained(path, output_loading_info=True)
    _, ours = splice.from_pretrained(
        T.AutoModelForCausalLM, path, fusion_config=FUSED, output_loading_info=True
    )
    assert ours == theirs and ours["unexpected_keys"] == {"model.extra.weight"}


def test_ignore_mismatched_sizes_stays_refused(llama_dir):
    with pytest.raises(
        LoadError, match=r"^splice.from_pretrained is strict: ignore_mismatched_sizes=True is not supported"
    ):
        splice.from_pretrained(T.AutoModelForCausalLM, llama_dir, ignore_mismatched_sizes=True)
