"""A model passed wrongly, or fused twice: one error saying what was expected, not an AttributeError or a
misleading reason."""

from __future__ import annotations

import pytest
import tiny
import torch

import splice
from splice.errors import FusionError
from splice.transforms import bitwise_equal


@pytest.mark.parametrize(
    ("call", "name"),
    [
        (lambda m: splice.fuse(m, ["qkv"]), "splice.fuse"),
        (lambda m: splice.unfuse(m), "splice.unfuse"),
        (lambda m: splice.original_state_dict(m), "splice.original_state_dict"),
        (lambda m: splice.fuse_modules(m, ["model.layers.*.mlp"]), "splice.fuse_modules"),
        (lambda m: splice.unfuse_modules(m), "splice.unfuse"),
    ],
)
def test_a_path_instead_of_a_model_is_a_clear_error(call, name):
    with pytest.raises(FusionError) as info:
        call("model")
    assert str(info.value) == (
        f"{name}: expected the model, a torch.nn.Module, got str 'model'; "
        "load it first (splice.from_pretrained loads a path fused)"
    )
    with pytest.raises(
        FusionError, match=rf"^{name}: expected the model, a torch.nn.Module, got dict \{{\}}$"
    ):
        call({})


def test_fusing_a_family_twice_says_it_is_already_fused():
    model = tiny.causal_lm("llama")
    splice.fuse(model, ["qkv", "gate_up"])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(FusionError) as info:
        splice.fuse(model, ["qkv"])
    assert str(info.value) == (
        "'qkv' is already fused in this model (2 module(s), e.g. model.layers.0.self_attn) and nothing is left to "
        "fuse; unfuse(model, family='qkv') first to fuse it again"
    )
    assert all(bitwise_equal(model.state_dict()[k], v) for k, v in before.items())
    splice.unfuse(model, family="qkv")
    assert splice.fuse(model, ["qkv"]).counts == {"qkv": 2}
    x = torch.randint(0, 128, (1, 5))
    assert model(x).logits.shape == (1, 5, 128)
