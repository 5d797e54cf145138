"""A family fuses every module it claims, or none, naming the ones it cannot fuse and why."""

from __future__ import annotations

import pytest
import tiny
import torch
from torch import nn

import splice
from splice.errors import FusionError
from splice.fusion import get_state
from splice.transforms import bitwise_equal


def snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items() if not v.is_meta}, list(model.modules())


def unchanged(model, before):
    tensors, modules = before
    assert get_state(model) is None
    assert all(bitwise_equal(model.state_dict()[k], v) for k, v in tensors.items())
    assert all(a is b for a, b in zip(model.modules(), modules))


class Rounded(nn.Linear):  # a Linear subclass whose forward is not Linear's math
    def forward(self, x):
        return super().forward(x).round()


class Wrapped(nn.Module):  # stands for a quantized or adapter-wrapped Linear
    def __init__(self, inner):
        super().__init__()
        self.inner = inner


@pytest.mark.parametrize(
    "family, edit, reason",
    [
        (
            "qkv",
            lambda layer: layer.self_attn.k_proj.half(),
            r"k_proj is torch.float16 on cpu, q_proj is torch.float32 on cpu",
        ),
        (
            "qkv",
            lambda layer: layer.self_attn.k_proj.to("meta"),
            r"k_proj is torch.float32 on meta, q_proj is torch.float32 on cpu",
        ),
        (
            "qkv",
            lambda layer: setattr(layer.self_attn, "v_proj", Rounded(64, 32, bias=False)),
            r"v_proj is a test_partial.Rounded, an nn.Linear subclass with its own forward \(not known to be nn.Linear's math\)",
        ),
        (
            "qkv",
            lambda layer: setattr(layer.self_attn, "k_proj", Wrapped(layer.self_attn.k_proj)),
            r"k_proj is a Wrapped, not an nn.Linear",
        ),
        (
            "gate_up",
            lambda layer: layer.mlp.up_proj.to(torch.bfloat16),
            r"up_proj is torch.bfloat16 on cpu, gate_proj is torch.float32 on cpu",
        ),
    ],
)
def test_one_unfusable_layer_refuses_the_family_naming_it(family, edit, reason):
    model = tiny.causal_lm("llama", num_hidden_layers=3)
    edit(model.model.layers[1])
    before = snapshot(model)
    where = "self_attn" if family == "qkv" else "mlp"
    with pytest.raises(
        FusionError,
        match=rf"^'{family}': 1 of the 3 modules it would fuse cannot be fused, so none is: "
        rf"model.layers.1.{where}: {reason}; make them agree, or pass the option modules=<regex> to fuse only the others$",
    ):
        splice.fuse(model, ["gate_up", family] if family == "qkv" else [family])
    unchanged(model, before)  # gate_up, fused first in the same call, was rolled back too


def test_the_modules_option_chooses_the_ones_to_fuse():
    model = tiny.causal_lm("llama", num_hidden_layers=3)
    model.model.layers[1].self_attn.k_proj.half()
    report = splice.fuse(model, {"qkv": {"modules": r"layers\.[02]\."}})
    assert sorted(r.path for r in report.records) == ["model.layers.0.self_attn", "model.layers.2.self_attn"]
    # inside the selection the rule holds: a claimed module that cannot fuse is refused
    model = tiny.causal_lm("llama", num_hidden_layers=3)
    model.model.layers[1].self_attn.k_proj.half()
    with pytest.raises(
        FusionError, match=r"^'qkv': 1 of the 2 modules .* model.layers.1.self_attn: k_proj is torch.float16"
    ):
        splice.fuse(model, {"qkv": {"modules": r"layers\.[01]\."}})


def test_the_message_lists_three_and_counts_the_rest():
    model = tiny.causal_lm("llama", num_hidden_layers=6)
    for layer in model.model.layers[1:]:
        layer.self_attn.k_proj.half()
    with pytest.raises(
        FusionError, match=r"^'qkv': 5 of the 6 modules .*model.layers.3.self_attn: k_proj .* and 2 more;"
    ):
        splice.fuse(model, ["qkv"])


def test_siblings_reading_another_width_are_not_a_group_the_family_claims():
    """Cross-attention whose k/v read encoder states of another width is not q/k/v of one input: skipped."""
    model = tiny.causal_lm("llama")
    attn = model.model.layers[1].self_attn
    attn.k_proj, attn.v_proj = nn.Linear(48, 32, bias=False), nn.Linear(48, 32, bias=False)
    report = splice.fuse(model, ["qkv"])
    assert [r.path for r in report.records] == ["model.layers.0.self_attn"]
