"""The strict check of a compiled plan: a missing key names the key, a wrong shape names both shapes."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from splice.errors import LoadError, WeightsMismatchError
from splice.loading.strict import check_plan, few, ignored_unexpected, meta_keys, needed_steps
from splice.transforms import TensorMeta
from splice.weightmap import WeightMap

F32 = torch.float32
QKV = WeightMap.of(["l.{q,k,v}.weight -> l.qkv.weight | concat(dim=0)"])


def metas(**shapes):
    return {k.replace("_", "."): TensorMeta(shape, F32) for k, shape in shapes.items()}


def checkpoint(extra=()):
    found = metas(l_q_weight=(4, 8), l_k_weight=(2, 8), l_v_weight=(2, 8), l_norm=(8,))
    return {**found, **{k: TensorMeta((1,), F32) for k in extra}}


def compile_(wm, found):
    return wm.compile(list(found), found)


def test_a_plan_that_fits_returns_the_keys_the_model_has_no_place_for():
    found = checkpoint(extra=["rotary.inv_freq"])
    plan = compile_(QKV, found)
    expected = metas(l_qkv_weight=(8, 8), l_norm=(8,))
    assert check_plan(plan, expected, set(), "ckpt") == ["rotary.inv_freq"]
    assert [s.targets for s in needed_steps(plan, expected)] == [("l.qkv.weight",), ("l.norm",)]


def test_a_missing_key_is_named_and_missing_ok_keys_are_not():
    plan = compile_(QKV, checkpoint())
    expected = metas(l_qkv_weight=(8, 8), l_norm=(8,), lm_head_weight=(3, 8), l_bias=(8,))
    with pytest.raises(WeightsMismatchError) as info:
        check_plan(plan, expected, {"lm.head.weight"}, "/ckpt")
    assert str(info.value) == (
        "/ckpt: the checkpoint has no weight for 1 model key(s): l.bias; refusing to leave them randomly initialized"
    )
    assert isinstance(info.value, LoadError)


def test_a_shape_mismatch_names_the_key_both_shapes_and_the_sources():
    plan = compile_(QKV, checkpoint())
    expected = metas(l_qkv_weight=(12, 8), l_norm=(8,))
    with pytest.raises(WeightsMismatchError) as info:
        check_plan(plan, expected, set(), "/ckpt", "the tensor-parallel plan")
    assert str(info.value) == (
        "/ckpt: l.qkv.weight has shape [8, 8] in the tensor-parallel plan (from l.q.weight, l.k.weight, "
        "l.v.weight) but the model expects [12, 8]"
    )


def test_unexpected_keys_transformers_ignores():
    model = nn.Linear(2, 2)
    model._keys_to_ignore_on_load_unexpected = [r"^extra\."]
    assert ignored_unexpected(model, "extra.w") and ignored_unexpected(model, "model.rotary_emb.inv_freq")
    assert ignored_unexpected(model, "embeddings.position_ids")
    assert not ignored_unexpected(model, "other.w") and not ignored_unexpected(model, "my_position_ids")


def test_meta_keys_and_few():
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(2, 2), nn.LayerNorm(2))
    model[1].weight = nn.Parameter(torch.ones(2))
    assert meta_keys(model) == {"0.weight", "0.bias", "1.bias"}
    assert few(["a", "b", "c"], 2) == "a, b and 1 more" and few(["a"]) == "a"
