"""`qkv_split` on checkpoints that ship q/k/v fused: every layout, read from the model's class and config."""

from __future__ import annotations

import copy
import filecmp

import pytest
import tiny
import torch
import transformers as T
from prefused import CONFIGS, FUSED_NAME, REFERENCE, attentions, build

import splice
from splice.errors import FusionError
from splice.fusion.qkv_split import ConcatLinears
from splice.transforms import bitwise_equal

KINDS = list(CONFIGS)


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("kind", KINDS)
def test_split_reads_q_k_v_as_the_model_does(kind):
    model = build(kind)
    reference = copy.deepcopy(model)
    report = splice.fuse(model, ["qkv_split"])
    assert report.counts == {"qkv_split": 2}
    ids = tiny.token_ids(length=7)
    torch.testing.assert_close(logits(model, ids), logits(reference, ids), rtol=0, atol=1e-5)
    x = torch.randn(2, 5, model.config.get_text_config().hidden_size)
    for attn, ref in zip(attentions(model), attentions(reference)):
        fused = getattr(attn, FUSED_NAME[kind])
        assert isinstance(fused, ConcatLinears)
        with torch.no_grad():
            expected = REFERENCE[kind](ref, getattr(ref, FUSED_NAME[kind])(x))
            parts = [getattr(attn, n)(x) for n in ("q_proj", "k_proj", "v_proj")]
            assert [type(getattr(attn, n)) for n in ("q_proj", "k_proj", "v_proj")] == [
                type(getattr(ref, FUSED_NAME[kind])) if kind.startswith("falcon") else torch.nn.Linear
            ] * 3
        for got, want in zip(parts, expected):
            torch.testing.assert_close(got, want, rtol=0, atol=1e-5)  # a wrong row is O(1) off
    original = splice.original_state_dict(model)
    expected = reference.state_dict()
    assert original.keys() == expected.keys()
    assert all(bitwise_equal(original[k], expected[k]) for k in expected)
    splice.unfuse(model)
    assert all(bitwise_equal(a, b) for a, b in zip(model.state_dict().values(), expected.values()))


@pytest.mark.parametrize("kind", ["falcon_gqa", "gpt_neox", "gpt2"])
def test_load_split_and_save_byte_identical(kind, tmp_path):
    path = tiny.save(build(kind), tmp_path / "src")
    model = splice.from_pretrained(T.AutoModelForCausalLM, path, fusion_config={"qkv_split": True})
    plain = T.AutoModelForCausalLM.from_pretrained(path)
    ids = tiny.token_ids(length=7)
    torch.testing.assert_close(logits(model, ids), logits(plain, ids), rtol=0, atol=1e-5)
    out = splice.save_pretrained(model, tmp_path / "out")
    assert filecmp.cmp(path / "model.safetensors", out / "model.safetensors", shallow=False)


def test_falcon_gqa_parts_have_the_kv_head_sizes():
    model = build("falcon_gqa")
    splice.fuse(model, ["qkv_split"])
    attn = model.transformer.h[0].self_attention
    assert [getattr(attn, n).out_features for n in ("q_proj", "k_proj", "v_proj")] == [48, 16, 16]
    assert type(attn.q_proj).__name__ == "FalconLinear"  # its rounding (bias after the GEMM) is kept


class HomegrownAttention(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.query_key_value = torch.nn.Linear(16, 48)


def test_an_unknown_prefused_layout_is_refused_by_name():
    model = torch.nn.Sequential(torch.nn.Linear(16, 16), HomegrownAttention())
    with pytest.raises(
        FusionError,
        match=r"HomegrownAttention\.query_key_value looks like a fused q/k/v projection, but how HomegrownAttention "
        r"orders its rows is not known.*pass the options name and sizes \(at 1\)",
    ):
        splice.fuse(model, ["qkv_split"])
    report = splice.fuse(model, {"qkv_split": {"name": "query_key_value", "sizes": [16, 16, 16]}})
    assert report.counts == {"qkv_split": 1}  # the user states the layout: [q; k; v]


def test_gpt_bigcode_cross_attention_is_refused():
    model = T.GPTBigCodeForCausalLM(
        T.GPTBigCodeConfig(
            vocab_size=128, n_embd=48, n_layer=1, n_head=4, multi_query=False, add_cross_attention=True
        )
    )
    with pytest.raises(
        FusionError, match=r"c_attn in cross-attention is not split \(at transformer\.h\.0\.crossattention\)"
    ):
        splice.fuse(model, ["qkv_split"])


def test_sizes_cannot_override_a_known_layout():
    model = build("gpt_neox")
    with pytest.raises(
        FusionError, match=r"GPTNeoXAttention\.query_key_value has a known layout.*drop option sizes"
    ):
        splice.fuse(model, {"qkv_split": {"name": "query_key_value", "sizes": [48, 48, 48]}})
