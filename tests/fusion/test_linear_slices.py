"""A slice of a fused Linear is never stale: it reads its input and the fused weight when it is called."""

from __future__ import annotations

import copy

import pytest
import tiny
import torch

import splice
from splice.fusion.linear import LinearSlice

MODES = {"no_grad": torch.no_grad, "inference_mode": torch.inference_mode, "grad": torch.enable_grad}


_MODEL = []


def fused_attention():
    """A fused attention block (a fresh copy) and the unfused one it came from."""
    if not _MODEL:
        _MODEL.append(tiny.causal_lm("llama", num_hidden_layers=1))
    reference = copy.deepcopy(_MODEL[0].model.layers[0].self_attn)
    attn = copy.deepcopy(reference)
    splice.fuse(attn, ["qkv"])
    assert isinstance(attn.k_proj, LinearSlice)
    return attn, reference


def same(a, b):
    torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(
    "mutate",
    [
        lambda x: x.mul_(2),
        lambda x: x[..., :8].zero_(),  # through a view
        lambda x: x.data.add_(1),  # through .data: no version counter sees it
        lambda x: x.copy_(torch.ones_like(x)),
    ],
    ids=["mul_", "view", "data", "copy_"],
)
def test_an_input_changed_in_place_between_sibling_calls(mode, mutate):
    attn, reference = fused_attention()
    with MODES[mode]():
        x = torch.randn(2, 5, 64)
        q = attn.q_proj(x)
        with torch.no_grad():
            mutate(x)
        k, v = attn.k_proj(x), attn.v_proj(x)
        same(k, reference.k_proj(x))
        same(v, reference.v_proj(x))
    x2 = torch.randn(2, 5, 64)
    with MODES[mode]():
        same(attn.q_proj(x2), reference.q_proj(x2))
    assert q.shape == (2, 5, 64)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(
    "change",
    ["data", "copy_", "swap", "parameter"],
)
def test_the_fused_weight_changed_between_sibling_calls(mode, change):
    attn, reference = fused_attention()
    fused = attn.qkv_proj
    new = torch.randn_like(fused.weight)
    with MODES[mode]():
        x = torch.randn(2, 5, 64)
        attn.q_proj(x)
        if change == "data":
            fused.weight.data[64:96] *= 2
            new = fused.weight.detach().clone()
        elif change == "copy_":
            with torch.no_grad():
                fused.weight.copy_(new)
        elif change == "swap":
            fused.weight.data = new
        else:
            fused.weight = torch.nn.Parameter(new)
        expected = torch.nn.functional.linear(x, new[64:96])
        same(attn.k_proj(x), expected)
        same(attn.v_proj(x), torch.nn.functional.linear(x, new[96:128]))
    del reference


def test_a_model_built_under_inference_mode_is_read_fresh_too():
    with torch.inference_mode():
        attn, reference = fused_attention()
        x = torch.randn(1, 3, 64)
        attn.q_proj(x)
        attn.qkv_proj.weight.mul_(0)  # an inference tensor: no version counter at all
        assert torch.count_nonzero(attn.k_proj(x)) == 0
        del reference
