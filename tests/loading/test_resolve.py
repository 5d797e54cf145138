"""Resolving dtype, device, config and class; the configs a save writes and a load reads back."""

from __future__ import annotations

import json

import pytest
import torch
import transformers as T

from splice.errors import LoadError
from splice.loading.resolve import (
    CONFIG_KEY,
    build_on_meta,
    load_config,
    model_class,
    pop_fusion_config,
    resolve_device,
    resolve_dtype,
    resolve_path,
    save_configs,
)
from splice.transforms import TensorMeta


class Reader:
    def __init__(self, *dtypes):
        self._metas = {f"t{i}": TensorMeta((1,), d) for i, d in enumerate(dtypes)}

    def metas(self):
        return self._metas


def config(**extra):
    return T.LlamaConfig(hidden_size=16, intermediate_size=24, num_hidden_layers=1, num_attention_heads=2,
                         num_key_value_heads=1, vocab_size=32, **extra)  # fmt: skip


def test_resolve_dtype():
    no_dtype = config()
    no_dtype.dtype = None
    reader = Reader(torch.int64, torch.bfloat16, torch.float32)
    assert resolve_dtype("float16", no_dtype, reader) == torch.float16
    assert resolve_dtype(torch.float64, no_dtype, reader) == torch.float64
    assert resolve_dtype("auto", no_dtype, reader) == torch.bfloat16  # the first floating tensor's
    assert resolve_dtype(None, config(dtype="float16"), reader) == torch.float16  # the config's
    assert resolve_dtype(None, no_dtype, Reader(torch.int64)) is None
    with pytest.raises(LoadError, match="unknown dtype"):
        resolve_dtype("float17", no_dtype, reader)
    with pytest.raises(LoadError, match="dtype must be a torch.dtype, a string or 'auto', got 3"):
        resolve_dtype(3, no_dtype, reader)


def test_resolve_device():
    assert resolve_device(None) is None and resolve_device("cpu") is None
    assert (
        resolve_device("meta") == torch.device("meta") and resolve_device(torch.device("cpu", 0)).index == 0
    )
    for refused in ("auto", "balanced", {"": 0}):
        with pytest.raises(LoadError, match=f"device_map={refused!r} is not supported"):
            resolve_device(refused)


def test_resolve_path_refuses_a_file(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"")
    assert resolve_path(tmp_path, {}) == tmp_path
    with pytest.raises(LoadError, match="is a file; pass the directory"):
        resolve_path(tmp_path / "model.safetensors", {})


def test_configs_written_by_a_save_load_back_with_the_fusion_popped(tmp_path):
    with torch.device("meta"):
        model = T.LlamaForCausalLM(config())
    tensors = {"a": torch.zeros(1, dtype=torch.int64), "b": torch.zeros(1, dtype=torch.bfloat16)}
    save_configs(model, tmp_path, tensors, fusion_config={"qkv": True})
    written = json.loads((tmp_path / "config.json").read_text())
    assert written[CONFIG_KEY] == {"qkv": True} and written["dtype"] == "bfloat16"
    assert written["architectures"] == ["LlamaForCausalLM"]
    assert (tmp_path / "generation_config.json").is_file()
    loaded = load_config(T.AutoModelForCausalLM, tmp_path, overrides={"pad_token_id": 3})
    assert loaded.pad_token_id == 3
    assert pop_fusion_config(loaded) == {"qkv": True} and not hasattr(loaded, CONFIG_KEY)
    assert pop_fusion_config(loaded) is None
    assert model_class(T.AutoModelForCausalLM, loaded) is T.LlamaForCausalLM
    assert model_class(T.LlamaModel, loaded) is T.LlamaModel
    save_configs(model, tmp_path, tensors)
    assert CONFIG_KEY not in json.loads((tmp_path / "config.json").read_text())
    with pytest.raises(LoadError, match=r"unknown keyword argument\(s\) \['no_such_option'\]"):
        load_config(T.AutoModelForCausalLM, tmp_path, overrides={"no_such_option": 1})
    with pytest.raises(LoadError, match="no config.json"):
        load_config(T.AutoModelForCausalLM, tmp_path / "nowhere")


def test_build_on_meta_leaves_the_default_dtype_and_sets_the_configs_dtype():
    before = torch.get_default_dtype()
    model = build_on_meta(T.LlamaForCausalLM, config(), "eager", torch.bfloat16)
    assert torch.get_default_dtype() == before
    assert all(p.is_meta for p in model.parameters())
    assert model.config.dtype == torch.bfloat16 and model.config._attn_implementation == "eager"
