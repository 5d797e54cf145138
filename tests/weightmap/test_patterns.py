"""Patterns: captures, fill, brace expansion, compact printing, layer numbers as ``*``."""

from __future__ import annotations

import pytest

from splice.errors import WeightMapError
from splice.weightmap import MAX_EXPANSION, Pattern
from splice.weightmap.patterns import compact, expand_braces, numbers, wildcard_numbers


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


def test_braces_expand_in_order_and_print_back_as_one_pattern():
    expanded = expand_braces("a.{q,k}.{w,b}")
    assert expanded == ["a.q.w", "a.q.b", "a.k.w", "a.k.b"]
    assert compact(["attn.q_proj.weight", "attn.k_proj.weight"]) == "attn.{q,k}_proj.weight"
    assert compact(["a.x.w", "b.y.w"]) == "a.x.w, b.y.w"  # differ in more than one component's middle


def test_a_brace_bomb_is_refused_before_it_expands():
    with pytest.raises(WeightMapError, match=f"expands into more than {MAX_EXPANSION} patterns"):
        expand_braces("w" + ".{a,b}" * 40)


@pytest.mark.parametrize(
    "key, expected",
    [
        ("model.layers.12.mlp.experts.3.w1", "model.layers.*.mlp.experts.*.w1"),
        ("model.layers.0", "model.layers.*"),
        ("h.3.attn.c_attn2.weight", "h.*.attn.c_attn2.weight"),  # a digit inside a name is not a number
        ("0.weight", "0.weight"),  # a leading component is no layer of anything
        ("model.norm.weight", "model.norm.weight"),
    ],
)
def test_wildcard_numbers_replaces_whole_numeric_components_only(key, expected):
    assert wildcard_numbers(key) == expected
    assert numbers(key) == tuple(p for p in key.split(".")[1:] if p.isdigit())
