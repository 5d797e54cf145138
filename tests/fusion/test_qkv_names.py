"""`qkv` on the other spellings of q/k/v (ctrl, xlm, cpmant, prophetnet) and on Whisper, whose k_proj has no bias."""

from __future__ import annotations

import copy

import pytest
import tiny
import torch
import transformers as T

import splice
from splice.errors import WeightMapError
from splice.fusion.linear import LinearSlice
from splice.transforms import bitwise_equal

SMALL = dict(vocab_size=128, pad_token_id=0, bos_token_id=1, eos_token_id=2)

MODELS = {
    "ctrl": (lambda: T.CTRLLMHeadModel(T.CTRLConfig(**SMALL, n_embd=48, dff=64, n_layer=2, n_head=4)), "Wq", 2),
    "xlm": (
        lambda: T.XLMWithLMHeadModel(T.XLMConfig(**SMALL, emb_dim=48, n_layers=2, n_heads=4, max_position_embeddings=64)),
        "q_lin",
        2,
    ),
    "cpmant": (
        lambda: T.CpmAntForCausalLM(
            T.CpmAntConfig(vocab_size=128, hidden_size=48, num_attention_heads=4, dim_head=12, dim_ff=64,
                           num_hidden_layers=2, prompt_length=4, prompt_types=4),
        ),
        "project_q",
        2,
    ),
    "prophetnet": (
        lambda: T.ProphetNetForCausalLM(
            T.ProphetNetConfig(**SMALL, hidden_size=48, encoder_ffn_dim=64, decoder_ffn_dim=64, num_encoder_layers=1,
                               num_decoder_layers=2, num_encoder_attention_heads=4, num_decoder_attention_heads=4,
                               max_position_embeddings=64, ngram=2, num_buckets=8, relative_max_distance=16)
        ),
        "query_proj",
        4,  # ngram self-attention and cross-attention per layer
    ),
}  # fmt: skip


def build(kind):
    torch.manual_seed(0)
    model = MODELS[kind][0]().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_()
    return model


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


@pytest.mark.parametrize("kind", list(MODELS))
def test_other_spellings_fuse_exactly(kind):
    model, (_, q_name, count) = build(kind), MODELS[kind]
    reference = copy.deepcopy(model)
    report = splice.fuse(model, ["qkv"])
    assert report.counts == {"qkv": count}
    assert sum(isinstance(m, LinearSlice) for m in model.modules()) == 3 * count
    assert all(
        isinstance(getattr(r.parent, q_name), LinearSlice) for r in splice.fusion.get_state(model).records
    )
    ids = tiny.token_ids(length=6)
    torch.testing.assert_close(logits(model, ids), logits(reference, ids), rtol=0, atol=1e-5)
    original, expected = splice.original_state_dict(model), reference.state_dict()
    assert list(original) == list(expected) and all(bitwise_equal(original[k], expected[k]) for k in expected)


def whisper():
    torch.manual_seed(0)
    config = T.WhisperConfig(
        vocab_size=128, d_model=48, encoder_layers=1, decoder_layers=1, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, num_mel_bins=8,
        max_source_positions=16, max_target_positions=32, pad_token_id=0, bos_token_id=1, eos_token_id=2,
        decoder_start_token_id=1,
    )  # fmt: skip
    model = T.WhisperForConditionalGeneration(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_()
    return model


def whisper_logits(model):
    g = torch.Generator().manual_seed(5)
    features = torch.randn(1, 8, 32, generator=g)
    with torch.no_grad():
        return model(input_features=features, decoder_input_ids=tiny.token_ids(1, 5)).logits


def test_whisper_k_proj_without_a_bias_gets_an_exact_zero_block(tmp_path):
    model = whisper()
    reference = copy.deepcopy(model)
    path = tiny.save(reference, tmp_path / "whisper")
    report = splice.fuse(model, ["qkv"])
    assert report.counts == {"qkv": 3}  # encoder self, decoder self and cross attention
    attn = model.model.encoder.layers[0].self_attn
    assert attn.qkv_proj.bias[48:96].count_nonzero() == 0 and attn.q_proj.bias.count_nonzero() == 48
    torch.testing.assert_close(whisper_logits(model), whisper_logits(reference), rtol=0, atol=1e-5)
    original, expected = splice.original_state_dict(model), reference.state_dict()
    assert list(original) == list(expected) and all(bitwise_equal(original[k], expected[k]) for k in expected)

    loaded = splice.from_pretrained(T.WhisperForConditionalGeneration, path, fusion_config=["qkv"])
    torch.testing.assert_close(whisper_logits(loaded), whisper_logits(reference), rtol=0, atol=1e-5)
    out = splice.save_pretrained(loaded, tmp_path / "out")
    assert (out / "model.safetensors").read_bytes() == (path / "model.safetensors").read_bytes()

    with torch.no_grad():  # as training would: the zero block learns
        attn.qkv_proj.bias[50] = 0.5
    with pytest.raises(
        WeightMapError,
        match=r"model\.encoder\.layers\.0\.self_attn\.qkv_proj\.bias -> .*q_proj\.bias, .*v_proj\.bias: drop_zeros.*"
        r"input 1 should be all zeros but 1 of 48 values are not",
    ):
        splice.original_state_dict(model)


class TaggedLinear(torch.nn.Linear):
    """A Linear subclass that keeps Linear's forward (and has its own constructor)."""

    def __init__(self, linear, tag):
        super().__init__(linear.in_features, linear.out_features, bias=linear.bias is not None)
        self.tag = tag
        self.load_state_dict(linear.state_dict())


@pytest.mark.parametrize("subclass", ["tagged", "falcon"])
def test_linear_subclasses_with_linears_math_fuse(subclass):
    from transformers.models.falcon.modeling_falcon import FalconLinear

    model = tiny.causal_lm("llama")
    for layer in model.model.layers:
        for name in ("q_proj", "k_proj", "v_proj"):
            old = getattr(layer.self_attn, name)
            if subclass == "tagged":
                new = TaggedLinear(old, name)
            else:
                new = FalconLinear(old.in_features, old.out_features, bias=False)
                new.load_state_dict(old.state_dict())
            setattr(layer.self_attn, name, new)
    reference = copy.deepcopy(model)
    assert splice.fuse(model, ["qkv"]).counts == {"qkv": 2}
    fused = model.model.layers[0].self_attn.qkv_proj
    assert type(fused) is (torch.nn.Linear if subclass == "tagged" else FalconLinear)
    ids = tiny.token_ids()
    torch.testing.assert_close(logits(model, ids), logits(reference, ids), rtol=0, atol=1e-5)
    splice.unfuse(model)
    assert type(model.model.layers[0].self_attn.q_proj) is type(reference.model.layers[0].self_attn.q_proj)
