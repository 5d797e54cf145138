"""ModuleFusionSpec: user families (registered or per call), and options reaching the spec."""

from __future__ import annotations

import copy
from dataclasses import dataclass

import pytest
import tiny
import torch
from torch import nn

import splice
from splice.errors import FusionError
from splice.fusion import FusionOptions, ModuleFusionSpec, get_state, registered_families
from splice.transforms import Concat
from splice.weightmap import Rule


class Block(nn.Module):
    """An attention-ish block spelling its projections query/key/value, plus two parallel heads."""

    def __init__(self, dim=12):
        super().__init__()
        self.query, self.key, self.value = nn.Linear(dim, 8), nn.Linear(dim, 4), nn.Linear(dim, 4)
        self.head_a, self.head_b = nn.Linear(dim, 3, bias=False), nn.Linear(dim, 5, bias=False)

    def forward(self, x):
        return torch.cat(
            [self.query(x), self.key(x) * self.value(x).sigmoid(), self.head_a(x), self.head_b(x)], -1
        )


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([Block() for _ in range(3)])

    def forward(self, x):
        return torch.stack([b(x) for b in self.blocks])


@dataclass(frozen=True)
class HeadsOptions(FusionOptions):
    fused_name: str = "heads"


class HeadsSpec(ModuleFusionSpec):
    """A user family: head_a and head_b read the same input, so they can be one Linear."""

    options_class = HeadsOptions

    def is_fusable(self, module, options):
        return isinstance(getattr(module, "head_a", None), nn.Linear) and isinstance(
            getattr(module, "head_b", None), nn.Linear
        )

    def make_fused_module(self, module, options):
        from splice.fusion.linear import LinearSlice, SharedGEMM

        shared = SharedGEMM(module, options.fused_name, (3, 5))
        fused = nn.Linear(12, 8, bias=False, device="meta")
        return {
            options.fused_name: fused,
            "head_a": LinearSlice(shared, 0, 12),
            "head_b": LinearSlice(shared, 1, 12),
        }

    def make_transforms(self, module, options):
        return [
            Rule(("head_a.weight", "head_b.weight"), (f"{options.fused_name}.weight",), (Concat(0, (3, 5)),))
        ]


def test_options_reach_the_spec_names_and_module_regex():
    net = Net()
    x = torch.randn(2, 12)
    expected = net(x)
    report = splice.fuse(net, {"qkv": {"names": ["query", "key", "value"], "modules": r"blocks\.[01]$"}})
    assert report.counts == {"qkv": 2}
    assert hasattr(net.blocks[0], "qkv_proj") and not hasattr(net.blocks[2], "qkv_proj")
    torch.testing.assert_close(net(x), expected, rtol=0, atol=1e-6)
    assert get_state(net).config == {"qkv": {"names": ["query", "key", "value"], "modules": r"blocks\.[01]$"}}


def test_fused_name_option():
    model = tiny.causal_lm("llama")
    splice.fuse(model, {"qkv": {"fused_name": "wqkv", "modules": r"layers\.0\."}})
    assert hasattr(model.model.layers[0].self_attn, "wqkv") and not hasattr(
        model.model.layers[1].self_attn, "wqkv"
    )


def test_a_spec_passed_per_call_needs_no_registration():
    net = Net()
    x = torch.randn(2, 12)
    expected = net(x)
    report = splice.fuse(net, {"heads": HeadsSpec()})
    assert report.counts == {"heads": 3} and "heads" not in registered_families()
    assert net.blocks[1].heads.weight.shape == (8, 12)
    torch.testing.assert_close(net(x), expected, rtol=0, atol=1e-6)
    splice.unfuse(net)
    torch.testing.assert_close(net(x), expected, rtol=0, atol=0)


def test_register_fusion_makes_a_family_usable_by_name():
    splice.register_fusion("test_heads", HeadsSpec(), replace=True)
    net = Net()
    splice.fuse(net, {"test_heads": {"fused_name": "both_heads"}})
    assert hasattr(net.blocks[0], "both_heads")
    with pytest.raises(FusionError, match="'test_heads' is already registered"):
        splice.register_fusion("test_heads", HeadsSpec())
    with pytest.raises(FusionError, match="needs a ModuleFusionSpec instance, got dict"):
        splice.register_fusion("bad", {})


def test_registering_changes_no_existing_model():
    model = tiny.causal_lm("llama")
    snapshot = copy.deepcopy(model.state_dict())
    splice.register_fusion("test_heads_2", HeadsSpec(), replace=True)
    assert get_state(model) is None and list(model.state_dict()) == list(snapshot)
