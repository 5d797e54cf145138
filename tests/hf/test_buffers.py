"""Computed buffers are filled before loading, so no weight init ever touches a loaded tensor (`splice.hf.buffers`)."""

from __future__ import annotations

import pytest
import torch
import transformers as T
from arch_sweep import tiny_config, vision_inputs
from safetensors.torch import load_file

import splice
from splice.errors import LoadError


def _saved(path) -> dict[str, torch.Tensor]:
    out = {}
    for file in sorted(path.glob("*.safetensors")):
        out.update(load_file(file))
    return out


def _assert_bitwise(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert sorted(a) == sorted(b)
    for key in a:
        assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key


@pytest.mark.parametrize("model_type", ["llava"])
def test_patch_embedding_weight_is_not_reinitialized(tmp_path, model_type):
    # CLIP's _init_weights on the embeddings (which own the computed position_ids) wrote random values
    # into the fused patch embedding: its `.weight` is a view without transformers' "initialized" flag
    torch.manual_seed(0)
    model = T.AutoModelForImageTextToText.from_config(tiny_config(model_type)).eval()
    model.save_pretrained(tmp_path / "src")
    pixels = vision_inputs(model)
    with torch.no_grad():
        expected = model.get_image_features(**pixels)
    fused = splice.from_pretrained(
        T.AutoModelForImageTextToText, tmp_path / "src", fusion_config={"patch_embeddings": True}
    )
    with torch.no_grad():
        got = fused.get_image_features(**pixels)
    torch.testing.assert_close(got.pooler_output, expected.pooler_output, rtol=0, atol=1e-5)
    splice.save_pretrained(fused, tmp_path / "out")
    _assert_bitwise(_saved(tmp_path / "src"), _saved(tmp_path / "out"))


def test_buffer_computed_by_an_ancestor_init(tmp_path):
    # Falcon-H1 fills each mixer's mup_vector from FalconH1Model's _init_weights; it was left uninitialized
    torch.manual_seed(0)
    model = T.AutoModelForCausalLM.from_config(tiny_config("falcon_h1")).eval()
    model.save_pretrained(tmp_path)
    loaded = splice.from_pretrained(T.AutoModelForCausalLM, tmp_path, fusion_config={})
    for ours, theirs in zip(loaded.model.layers, model.model.layers):
        assert torch.equal(ours.mamba.mup_vector, theirs.mamba.mup_vector)
    ids = torch.tensor([[5, 9, 13, 17, 21]])
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=0, atol=1e-5)


class _ExtraBufferLlama(T.LlamaForCausalLM):
    def __init__(self, config):
        super().__init__(config)
        self.model.norm.register_buffer(
            "scale", torch.ones(3), persistent=False
        )  # no _init_weights computes it


def test_a_buffer_no_init_computes_is_refused(tmp_path):
    config = T.LlamaConfig(
        hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=2, vocab_size=64
    )
    T.LlamaForCausalLM(config).save_pretrained(tmp_path)
    with pytest.raises(
        LoadError, match=r"model\.norm\.scale: computed buffer\(s\) that the model's _init_weights"
    ):
        splice.from_pretrained(_ExtraBufferLlama, tmp_path)


def test_parameters_built_with_data_are_filled_by_the_checkpoint(tmp_path):
    # DiffLlama draws lambda_q1 and friends with torch.normal while it is built, even on meta
    torch.manual_seed(0)
    model = T.AutoModelForCausalLM.from_config(tiny_config("diffllama")).eval()
    model.save_pretrained(tmp_path)
    loaded = splice.from_pretrained(T.AutoModelForCausalLM, tmp_path, fusion_config={"qkv": True})
    assert torch.equal(loaded.model.layers[0].self_attn.lambda_q1, model.model.layers[0].self_attn.lambda_q1)
    ids = torch.tensor([[5, 9, 13, 17, 21]])
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=0, atol=1e-5)
