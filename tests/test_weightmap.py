"""WeightMap: compile, invert, compose, conflicts, unclaimed keys, JSON."""

from __future__ import annotations

import json

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from splice.errors import WeightMapError
from splice.transforms import Concat, Stack, TensorMeta, bitwise_equal
from splice.weightmap import Pattern, Rule, WeightMap

FUSED = WeightMap.parse(
    [
        "model.layers.*.self_attn.{q,k,v}_proj.weight -> model.layers.*.self_attn.qkv_proj.weight | concat(dim=0)",
        "model.layers.*.mlp.{gate,up}_proj.weight -> model.layers.*.mlp.gate_up_proj.weight | concat(dim=0)",
    ]
)


def llama_state_dict(layers=2, hidden=16, heads=4, kv_heads=2, inter=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    d = hidden // heads
    sd = {"model.embed_tokens.weight": torch.randn(32, hidden, generator=g)}
    for i in range(layers):
        p = f"model.layers.{i}."
        sd[p + "self_attn.q_proj.weight"] = torch.randn(heads * d, hidden, generator=g)
        sd[p + "self_attn.k_proj.weight"] = torch.randn(kv_heads * d, hidden, generator=g)
        sd[p + "self_attn.v_proj.weight"] = torch.randn(kv_heads * d, hidden, generator=g)
        sd[p + "self_attn.o_proj.weight"] = torch.randn(hidden, heads * d, generator=g)
        sd[p + "mlp.gate_proj.weight"] = torch.randn(inter, hidden, generator=g)
        sd[p + "mlp.up_proj.weight"] = torch.randn(inter, hidden, generator=g)
        sd[p + "mlp.down_proj.weight"] = torch.randn(hidden, inter, generator=g)
        sd[p + "input_layernorm.weight"] = torch.randn(hidden, generator=g)
    sd["lm_head.weight"] = torch.randn(32, hidden, generator=g)
    return sd


def metas(sd):
    return {k: TensorMeta.of(v) for k, v in sd.items()}


def assert_same(a, b):
    assert list(a) == list(b) or set(a) == set(b)
    for k in a:
        assert bitwise_equal(a[k], b[k]), k


def test_patterns_capture_and_fill():
    p = Pattern("model.layers.*.mlp.experts.#.w1")
    assert p.match("model.layers.3.mlp.experts.12.w1") == (("3",), 12)
    assert p.match("model.layers.3.mlp.experts.x.w1") is None
    assert p.fill(["7"], 2) == "model.layers.7.mlp.experts.2.w1"
    assert Pattern("visual.**").match("visual.blocks.0.attn.qkv.weight") == (
        ("blocks.0.attn.qkv.weight",),
        None,
    )
    assert Pattern("layers.*.weight").match("layers.1.2.weight") is None  # '*' is one component


def test_rules_read_like_the_change_they_make():
    rule = FUSED.rules[0]
    assert [p.text for p in rule.sources] == [
        "model.layers.*.self_attn.q_proj.weight",
        "model.layers.*.self_attn.k_proj.weight",
        "model.layers.*.self_attn.v_proj.weight",
    ]
    assert str(rule) == (
        "model.layers.*.self_attn.{q,k,v}_proj.weight -> model.layers.*.self_attn.qkv_proj.weight | concat(dim=0)"
    )
    assert Rule.parse(str(rule)) == rule


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


def test_json_round_trip_and_human_forms():
    sd = llama_state_dict()
    resolved = FUSED.resolve(metas(sd))
    assert WeightMap.from_json(resolved.to_json()) == resolved
    data = json.loads(resolved.to_json())
    assert data["rules"][0]["ops"] == [{"op": "concat", "dim": 0, "sizes": [16, 8, 8]}]
    assert WeightMap.from_dict([str(r) for r in resolved.rules]) == resolved
    staged = WeightMap.renames({"a.": "b."}).then(resolved)
    assert WeightMap.from_json(staged.to_json()) == staged


@pytest.mark.parametrize(
    "document, message",
    [
        ("{", "not valid JSON"),
        ('{"rules": [{"sources": ["a"]}]}', "a rule is a string or a dict with 'sources' and 'targets'"),
        ('{"rules": ["a -> b | concatt(dim=0)"]}', "unknown op 'concatt'"),
        ('{"rules": ["a.* -> b"]}', "target b has 0 '\\*' captures, sources have 1"),
        ('{"rules": ["a, b -> c"]}', "without ops, sources and targets must pair up"),
        ('{"format": "other", "rules": []}', "not a splice.weightmap version 1 document"),
        ('{"rules": [{"sources": "a", "targets": "b", "opz": []}]}', r"unknown field\(s\) \['opz'\]"),
    ],
)
def test_malformed_maps_get_clear_errors(tmp_path, document, message):
    path = tmp_path / "map.json"
    path.write_text(document)
    with pytest.raises(WeightMapError, match=message) as info:
        WeightMap.load(path)
    assert str(info.value).startswith(str(path))


CONCAT_15 = '{"sources": ["a.{q,k}"], "targets": ["a.qk"], "ops": [{"op": "concat", "dim": 1.5}]}'


@pytest.mark.parametrize(
    "document, message",
    [
        ('{"rules": 5}', "field rules must be a list, got 5"),
        ('{"rules": "a -> b"}', "field rules must be a list, got 'a -> b'"),
        ('{"stages": 5}', "field stages must be a list of {'rules': [...]} dicts, got 5"),
        ('{"stages": [5]}', "stage 1: a stage is a dict with only 'rules', got 5"),
        ('{"stages": ["x"]}', "stage 1: a stage is a dict with only 'rules', got 'x'"),
        ('{"stages": [{"rules": []}, {"rules": 5}]}', "stage 2: field rules must be a list, got 5"),
        (
            '{"stages": [{"rules": ["a -> b", 5]}]}',
            "stage 1, rule 2: a rule is a string or a dict with 'sources' and 'targets', got 5",
        ),
        (f'["a -> b", {CONCAT_15}]', "rule 2: op concat: field dim must be an int, got 1.5"),
        (
            '["a.{q,k} -> a.qk | concat(dim=True)"]',
            "rule 'a.{q,k} -> a.qk | concat(dim=True)': op concat: field dim must be an int, got True",
        ),
        (
            '["a -> b | transpose(dim0=\\"a\\")"]',
            "rule 'a -> b | transpose(dim0=\"a\")': op transpose: field dim0 must be an int, got 'a'",
        ),
        (
            '["a -> b | permute_blocks(dim=0, blocks=(2, 2), perm=1)"]',
            "rule 'a -> b | permute_blocks(dim=0, blocks=(2, 2), perm=1)': "
            "op permute_blocks: field perm must be a list of ints, got 1",
        ),
        ('[{"sources": [1], "targets": ["b"]}]', "rule 1: field sources must be a list of strings, got [1]"),
        ('[{"sources": "a", "targets": ["b"]}]', "rule 1: field sources must be a list of strings, got 'a'"),
        ('[{"sources": ["a"], "targets": "b"}]', "rule 1: field targets must be a list of strings, got 'b'"),
        (
            '[{"sources": ["a"], "targets": ["b"], "ops": "concat"}]',
            "rule 1: field ops must be a list, got 'concat'",
        ),
    ],
)
def test_mistyped_fields_are_named_with_their_rule(tmp_path, document, message):
    path = tmp_path / "map.json"
    path.write_text(document)
    with pytest.raises(WeightMapError) as info:
        WeightMap.load(path)
    assert str(info.value) == f"{path}: {message}"


def test_a_map_that_cannot_be_written_is_a_clear_error(tmp_path):
    with pytest.raises(WeightMapError) as info:
        FUSED.save(tmp_path / "missing" / "map.json")
    assert (
        str(info.value)
        == f"cannot write weight map {tmp_path / 'missing' / 'map.json'}: No such file or directory"
    )


def test_missing_map_file():
    with pytest.raises(WeightMapError, match="cannot read weight map /nonexistent/map.json"):
        WeightMap.load("/nonexistent/map.json")
