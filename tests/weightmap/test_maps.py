"""WeightMap and Rule: text and JSON forms, generalizing per-layer rules, errors reading and writing maps."""

from __future__ import annotations

import json

import pytest
from llama_sd import FUSED, llama_state_dict, metas

from splice.errors import WeightMapError
from splice.weightmap import Rule, WeightMap


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


def test_generalize_folds_per_layer_rules_into_one_that_compiles_the_same():
    sd = llama_state_dict(layers=3)
    per_layer = WeightMap.of(
        f"model.layers.{i}.self_attn.{{q,k,v}}_proj.weight -> model.layers.{i}.self_attn.qkv_proj.weight | concat(dim=0)"
        for i in range(3)
    )
    general = per_layer.generalize(sd, metas(sd))
    assert str(general) == str(FUSED.rules[0])
    assert [str(s) for s in general.compile(sd, metas(sd)).steps] == [
        str(s) for s in per_layer.compile(sd, metas(sd)).steps
    ]
    # Layers whose rules differ do not fold: the map stays as it was.
    uneven = WeightMap.of(
        [*per_layer.rules[:2], "model.layers.2.mlp.up_proj.weight -> model.layers.2.mlp.up.weight"]
    )
    assert uneven.generalize(sd, metas(sd)) == uneven


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
