"""Compiling maps: steps, inverses, composition, collected indices, and the errors of a map that does not fit."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from llama_sd import FUSED, assert_same, llama_state_dict, metas

from splice.errors import WeightMapError
from splice.transforms import Concat, Stack, TensorMeta, bitwise_equal
from splice.weightmap import WeightMap


def test_compile_reports_plan_unclaimed_and_unused():
    sd = llama_state_dict()
    wm = WeightMap.of(list(FUSED.rules) + ["model.norm.weight -> model.final_norm.weight"])
    plan = wm.compile(sd, metas(sd))
    fused_steps = [s for s in plan.steps if not s.is_rename]
    assert len(fused_steps) == 4
    qkv = plan.step_for("model.layers.1.self_attn.qkv_proj.weight")
    assert qkv.sources == tuple(f"model.layers.1.self_attn.{x}_proj.weight" for x in "qkv")
    assert qkv.ops == (Concat(0, (16, 8, 8)),)
    assert qkv.target_metas == (TensorMeta((32, 16), torch.float32),)
    assert "model.embed_tokens.weight" in plan.unclaimed and "lm_head.weight" in plan.unclaimed
    assert [str(r) for r in plan.unused_rules] == ["model.norm.weight -> model.final_norm.weight"]
    assert plan.target_metas["model.layers.0.mlp.gate_up_proj.weight"].shape == (48, 16)


def test_runtime_and_original_are_exact_inverses():
    sd = llama_state_dict()
    runtime = FUSED.resolve(metas(sd)).to_runtime(sd)
    assert (
        "model.layers.0.self_attn.qkv_proj.weight" in runtime
        and "model.layers.0.self_attn.q_proj.weight" not in runtime
    )
    back = FUSED.resolve(metas(sd)).to_original(runtime)
    assert_same(back, sd)


@given(
    st.integers(1, 3),
    st.integers(1, 4),
    st.integers(1, 4),
    st.integers(1, 9),
    st.sampled_from([torch.float32, torch.bfloat16, torch.int8]),
)
def test_round_trip_over_uneven_shapes(layers, heads, kv_heads, inter, dtype):
    sd = {k: v.to(dtype) for k, v in llama_state_dict(layers, 4 * heads, heads, kv_heads, inter).items()}
    resolved = FUSED.resolve(metas(sd))
    plan = resolved.compile(sd, metas(sd))
    runtime = dict(plan.run(sd.__getitem__))
    assert_same(dict(plan.inverse().run(runtime.__getitem__)), sd)
    assert_same(resolved.invert().to_runtime(runtime), sd)


def test_an_incomplete_group_names_the_missing_key():
    sd = llama_state_dict()
    del sd["model.layers.1.self_attn.v_proj.weight"]
    with pytest.raises(WeightMapError, match=r"but not model\.layers\.1\.self_attn\.v_proj\.weight"):
        FUSED.compile(sd, metas(sd))


def test_two_rules_claiming_one_key_is_an_error_naming_both():
    wm = WeightMap.of(list(FUSED.rules) + ["model.layers.*.self_attn.q_proj.* -> model.layers.*.q.*"])
    sd = llama_state_dict()
    with pytest.raises(WeightMapError) as info:
        wm.compile(sd, metas(sd))
    message = str(info.value)
    assert "'model.layers.0.self_attn.q_proj.weight' is claimed by two rules" in message
    assert "qkv_proj" in message and "model.layers.*.q.*" in message


def test_a_target_produced_twice_is_an_error():
    wm = WeightMap.of(["model.layers.0.input_layernorm.weight -> model.embed_tokens.weight"])
    sd = llama_state_dict(layers=1)
    with pytest.raises(
        WeightMapError,
        match="'model.embed_tokens.weight' is produced twice: by the unclaimed key 'model.embed_tokens.weight' and by rule model.layers.0.input_layernorm.weight",
    ):
        wm.compile(sd, metas(sd))


def test_shape_mismatch_names_the_rule_and_the_shapes():
    sd = llama_state_dict()
    sd["model.layers.0.self_attn.k_proj.weight"] = torch.zeros(8, 15)
    with pytest.raises(
        WeightMapError, match=r"on model\.layers\.0\.self_attn\.\{q,k,v\}_proj\.weight.*must agree"
    ):
        FUSED.compile(sd, metas(sd))


def test_an_unresolved_map_says_how_to_invert_it():
    with pytest.raises(WeightMapError, match="cannot be inverted before its sizes are known"):
        FUSED.invert()


def test_compose_with_prefix_renames():
    """A checkpoint saying 'visual.' where the model says 'model.visual.' composes with the fusion rules."""
    fusion = WeightMap.parse(
        [
            "model.visual.patch_embed.proj.weight -> model.visual.patch_embed.linear_proj.weight | conv_to_linear"
        ]
    )
    wm = WeightMap.renames({"visual.": "model.visual.", "model.": "model.language_model."}).then(fusion)
    sd = {
        "visual.patch_embed.proj.weight": torch.randn(8, 3, 2, 4, 4),
        "visual.blocks.0.attn.qkv.weight": torch.randn(24, 8),
        "model.layers.0.mlp.up_proj.weight": torch.randn(6, 4),
    }
    plan = wm.compile(sd, metas(sd))
    runtime = dict(plan.run(sd.__getitem__))
    assert sorted(runtime) == [
        "model.language_model.layers.0.mlp.up_proj.weight",
        "model.visual.blocks.0.attn.qkv.weight",
        "model.visual.patch_embed.linear_proj.weight",
    ]
    patch = plan.step_for("model.visual.patch_embed.linear_proj.weight")
    assert patch.sources == ("visual.patch_embed.proj.weight",) and len(patch.program) == 1
    assert runtime["model.visual.patch_embed.linear_proj.weight"].shape == (8, 96)
    assert_same(dict(plan.inverse().run(runtime.__getitem__)), sd)
    resolved = wm.resolve(metas(sd))
    assert_same(resolved.invert().to_runtime(runtime), sd)


def test_collected_indices_stack_experts_and_unstack_back():
    wm = WeightMap.parse(["layers.*.experts.#.w1 -> layers.*.experts.w1 | stack(dim=0)"])
    sd = {f"layers.{i}.experts.{e}.w1": torch.randn(3, 2) for i in range(2) for e in range(4)}
    runtime = wm.to_runtime(sd)
    assert runtime["layers.1.experts.w1"].shape == (4, 3, 2)
    assert bitwise_equal(runtime["layers.1.experts.w1"][2], sd["layers.1.experts.2.w1"])
    assert_same(wm.invert().to_runtime(runtime), sd)
    assert wm.invert().rules[0].ops == (Stack(0).inverted(),)
    del sd["layers.0.experts.2.w1"]
    with pytest.raises(WeightMapError, match=r"indices \[2\] are missing among layers\.0\.experts\.2\.w1"):
        wm.compile(sd, metas(sd))


def test_plan_streams_one_step_at_a_time():
    sd = llama_state_dict()
    plan = FUSED.compile(sd, metas(sd))
    fetched = []

    def get(key):
        fetched.append(key)
        return sd[key]

    stream = plan.run(get)
    first_key, first = next(stream)
    assert len(fetched) == len(plan.step_for(first_key).sources)
    assert len(dict(stream)) + 1 == len(plan.target_keys)
    assert sorted(fetched) == sorted(sd)
