"""transformers' weight converters as exact splice ops: same tensors as transformers' own ops, bitwise back.

Each case takes a converter from transformers' real conversion mapping, runs transformers' own ops on a
random checkpoint tensor, and compares with what splice's translation produces; the inverse must
give the checkpoint tensor back bit for bit. A tiny hrm_text model then loads and saves end to end.
"""

from __future__ import annotations

import filecmp
from types import SimpleNamespace

import pytest
import tiny
import torch
import transformers as T
from safetensors.torch import load_file
from transformers.conversion_mapping import get_checkpoint_conversion_mapping

import splice
from splice.hf.conversions import translate
from splice.transforms import TensorMeta, bitwise_equal
from splice.weightmap import WeightMap


class FakeModel:
    """What translate and transformers' ops read from a model: its config and its parameters' shapes."""

    def __init__(self, config, shapes=None):
        self.config, self.shapes = config, shapes or {}

    def get_parameter(self, key):
        if key not in self.shapes:
            raise AttributeError(key)
        return torch.empty(self.shapes[key], device="meta")


def converter(model_type, source):
    mapping = get_checkpoint_conversion_mapping(model_type)
    return next(c for c in mapping if type(c).__name__ == "WeightConverter" and source in c.source_patterns)


def transformers_convert(conv, inputs, target, model):
    """transformers' own ops on the collected tensors, keyed by full target key."""
    collected = {pattern: list(tensors) for pattern, tensors in inputs.items()}
    for op in conv.operations:
        collected = op.convert(
            collected, conv.source_patterns, conv.target_patterns, full_layer_name=target, model=model,
            config=model.config,
        )  # fmt: skip
    first = conv.target_patterns[0]
    return {target.replace(first, name, 1): t for name, t in collected.items()}


def splice_round_trip(conv, keys_by_slot, tensors, target, model, expected):
    metas = {k: TensorMeta.of(t) for k, t in tensors.items()}
    first, second = translate(conv, target, keys_by_slot, metas, model)
    weight_map = WeightMap.of(first).then(WeightMap.of(second))
    plan = weight_map.compile(list(tensors), metas)
    out = dict(plan.run(tensors.__getitem__))
    assert out.keys() == expected.keys()
    for key in expected:
        assert bitwise_equal(out[key], expected[key].contiguous()), key
    back = dict(plan.inverse().run(out.__getitem__))
    assert back.keys() == tensors.keys() and all(bitwise_equal(back[k], tensors[k]) for k in tensors)


def random(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


CONFIG = SimpleNamespace(num_attention_heads=4, vision_config=SimpleNamespace(num_attention_heads=3))
CONFIG.get_text_config = lambda: CONFIG


@pytest.mark.parametrize(
    "model_type, source, key, target, shape",
    [
        ("hrm_text", "attn.gqkv_proj.weight", "m.layers.0.attn.gqkv_proj.weight", "m.layers.0.self_attn.gate_proj.weight", (64, 16)),
        ("qianfan_ocr", "attn.qkv.bias", "v.layers.0.attn.qkv.bias", "v.layers.0.attention.q_proj.bias", (36,)),
        ("kimi_k25", "wqkv", "vt.layers.1.wqkv.weight", "vt.layers.1.attn.q_proj.weight", (72, 10)),  # Chunk + rope
        ("ernie4_5_vl_moe", "mlp.moe_statics.e_score_correction_bias", "l.0.mlp.moe_statics.e_score_correction_bias",
         "l.0.mlp.text_moe.gate.moe_statics.e_score_correction_bias", (2, 6)),
        ("inkling2_text", r"mlp\.experts\.w13_weight", "l.0.mlp.experts.w13_weight", "l.0.mlp.experts.gate_up_proj", (3, 8, 5)),
        ("ernie4_5_vl_moe", "mlp.gate.weight", "l.0.mlp.gate.weight", "l.0.mlp.text_moe.gate.weight", (6, 4)),
        ("inkling_mm_model", "mlp.w13_dn.weight", "l.0.mlp.w13_dn.weight", "l.0.mlp.gate_proj.weight", (12, 5)),
        ("inkling_mm_model", "shared_w13_weight", "l.0.shared_w13_weight", "l.0.gate_proj", (3, 10, 4)),
    ],
)  # fmt: skip
def test_one_key_converters_match_transformers(model_type, source, key, target, shape):
    conv = converter(model_type, source)
    tensors = {key: random(*shape)}
    model = FakeModel(CONFIG)
    expected = transformers_convert(conv, {source: [tensors[key]]}, target, model)
    splice_round_trip(conv, {0: [key]}, tensors, target, model, expected)


@pytest.mark.parametrize("stored", [(2, 6, 4), (2, 4, 6)])  # transposed, or already the model's shape
def test_transpose_with_check_dims(stored):
    conv = converter("qwen3_vl_moe", "mlp.experts.down_proj")
    key = target = "l.0.mlp.experts.down_proj"
    model = FakeModel(CONFIG, {target: (2, 4, 6)})
    tensors = {key: random(*stored)}
    expected = transformers_convert(conv, {conv.source_patterns[0]: [tensors[key]]}, target, model)
    assert expected[target].shape == (2, 4, 6)
    splice_round_trip(conv, {0: [key]}, tensors, target, model, expected)


def test_ernie_text_and_vision_experts_match_transformers():
    conv = converter("ernie4_5_vl_moe", "experts.*.gate_proj.weight")
    experts = 4
    tensors, slots, inputs = {}, {}, {}
    for slot, pattern in enumerate(conv.source_patterns):
        keys = [f"l.1.mlp.{pattern.replace('*', str(e))}" for e in range(experts)]
        for e, key in enumerate(keys):
            tensors[key] = random(3, 5, seed=10 * slot + e)
        slots[slot], inputs[pattern] = keys, [tensors[k] for k in keys]
    target = "l.1.mlp.text_moe.experts.gate_up_proj"
    model = FakeModel(CONFIG)
    expected = transformers_convert(conv, inputs, target, model)
    assert {tuple(t.shape) for t in expected.values()} == {(2, 6, 5)}
    splice_round_trip(conv, slots, tensors, target, model, expected)


def test_hrm_text_loads_through_its_chunk_converters_and_saves_back(tmp_path):
    config = T.HrmTextConfig(
        vocab_size=128, hidden_size=32, intermediate_size=48, num_hidden_layers=4, num_layers_per_stack=2,
        num_attention_heads=2, head_dim=16, H_cycles=1, L_cycles=1, max_position_embeddings=64,
    )  # fmt: skip
    torch.manual_seed(0)
    path = tiny.save(T.AutoModelForCausalLM.from_config(config).eval(), tmp_path / "hrm")
    plain = T.AutoModelForCausalLM.from_pretrained(path)
    ids = tiny.token_ids(length=6)
    with torch.no_grad():
        expected = plain(input_ids=ids).logits
    for fusion in ({}, {"qkv": True, "gate_up": True}):
        model = splice.from_pretrained(T.AutoModelForCausalLM, path, fusion_config=fusion)
        with torch.no_grad():
            torch.testing.assert_close(model(input_ids=ids).logits, expected, rtol=0, atol=1e-5)
        out = splice.save_pretrained(model, tmp_path / f"out{len(fusion)}")
        assert filecmp.cmp(path / "model.safetensors", out / "model.safetensors", shallow=False)


def test_kimi_k25_loads_its_vision_wqkv_through_chunk_and_rope_permutation(tmp_path):
    config = T.AutoConfig.for_model(
        "kimi_k25",
        vision_config=dict(
            num_attention_heads=2, num_hidden_layers=1, hidden_size=32, intermediate_size=48, pos_emb_height=8,
            pos_emb_width=8,
        ),
        text_config=dict(
            vocab_size=128, hidden_size=32, intermediate_size=48, moe_intermediate_size=16, num_hidden_layers=2,
            num_attention_heads=2, num_key_value_heads=2, n_routed_experts=4, kv_lora_rank=8, q_lora_rank=16,
            qk_rope_head_dim=8, v_head_dim=16, qk_nope_head_dim=8, n_group=1, topk_group=1, num_experts_per_tok=2,
            first_k_dense_replace=1, max_position_embeddings=64, head_dim=8,
        ),
    )  # fmt: skip
    torch.manual_seed(0)
    cls = T.AutoModelForImageTextToText
    path = tiny.save(cls.from_config(config).eval(), tmp_path / "kimi")
    plain, model = cls.from_pretrained(path), splice.from_pretrained(cls, path, fusion_config={})
    expected, loaded = plain.state_dict(), model.state_dict()
    assert any(k.endswith("layers.0.attn.q_proj.weight") for k in loaded)  # the checkpoint has wqkv
    assert loaded.keys() == expected.keys() and all(bitwise_equal(loaded[k], expected[k]) for k in expected)
    out = splice.save_pretrained(model, tmp_path / "out")
    assert filecmp.cmp(path / "model.safetensors", out / "model.safetensors", shallow=False)


def load_and_save_like_transformers(cls, path, tmp_path, *, byte_identical=True):
    """splice loads ``path`` with {} into what transformers loads, and saves ``path``'s file back byte for byte
    (or, with ``byte_identical=False``, the tensors transformers' own save writes)."""
    plain, model = cls.from_pretrained(path), splice.from_pretrained(cls, path, fusion_config={})
    expected, loaded = plain.state_dict(), model.state_dict()
    assert loaded.keys() == expected.keys() and all(bitwise_equal(loaded[k], expected[k]) for k in expected)
    out = splice.save_pretrained(model, tmp_path / "out")
    if byte_identical:
        assert filecmp.cmp(path / "model.safetensors", out / "model.safetensors", shallow=False)
    else:
        plain.save_pretrained(tmp_path / "plain")
        ours, theirs = (
            load_file(out / "model.safetensors"),
            load_file(tmp_path / "plain" / "model.safetensors"),
        )
        assert ours.keys() == theirs.keys() and all(bitwise_equal(ours[k], theirs[k]) for k in theirs)
    return loaded


def test_qianfan_ocr_chunks_its_vision_qkv_and_bias(tmp_path):
    config = T.AutoConfig.for_model(
        "qianfan_ocr",
        vision_config=dict(
            hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=48, image_size=[28, 28],
            patch_size=[14, 14],
        ),
        text_config=dict(
            vocab_size=128, hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=2,
            num_key_value_heads=1, head_dim=16, max_position_embeddings=64,
        ),
    )  # fmt: skip
    torch.manual_seed(0)
    cls = T.AutoModelForImageTextToText
    path = tiny.save(cls.from_config(config).eval(), tmp_path / "qianfan")
    loaded = load_and_save_like_transformers(cls, path, tmp_path)
    assert any(k.endswith("attention.k_proj.bias") for k in loaded)  # the checkpoint has attn.qkv.bias


def test_qwen3_vl_moe_experts_stored_transposed_load_and_save_back(tmp_path):
    """Qwen3-VL-MoE checkpoints store experts as [E, in, out]; transformers transposes them (check_dims)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    config = T.AutoConfig.for_model(
        "qwen3_vl_moe",
        vision_config=dict(
            hidden_size=32, depth=1, num_heads=2, intermediate_size=48, out_hidden_size=32, deepstack_visual_indexes=[]
        ),
        text_config=dict(
            vocab_size=128, hidden_size=32, intermediate_size=48, moe_intermediate_size=16, num_hidden_layers=1,
            num_attention_heads=2, num_key_value_heads=1, head_dim=16, num_experts=4, num_experts_per_tok=2,
            max_position_embeddings=64,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
        ),
    )  # fmt: skip
    torch.manual_seed(0)
    cls = T.AutoModelForImageTextToText
    path = tiny.save(cls.from_config(config).eval(), tmp_path / "qwen3vlmoe")
    with safe_open(path / "model.safetensors", "pt") as f:  # as the released checkpoints store them
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        metadata = f.metadata()
    experts = [k for k in tensors if k.endswith(("experts.gate_up_proj", "experts.down_proj"))]
    assert experts
    for key in experts:
        tensors[key] = tensors[key].transpose(1, 2).contiguous()
    save_file(tensors, path / "model.safetensors", metadata=metadata)
    # saving goes through transformers' own reverse conversion, whose check_dims sees the model's shape
    # and so writes [E, out, in]: the tensors transformers writes, not the file's bytes
    load_and_save_like_transformers(cls, path, tmp_path, byte_identical=False)
