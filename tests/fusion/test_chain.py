"""Chain fusion by glob (`fuse_modules`), the `norm_mlp` family built on it, and kernel plugging."""

from __future__ import annotations

import copy

import pytest
import tiny
import torch
from torch import nn

import splice
from splice.errors import FusionError
from splice.fusion import FusedChain, PassThrough
from splice.kernels import register_kernel, use_kernel
from splice.transforms import bitwise_equal

GLOBS = ["model.layers.*.post_attention_layernorm", "model.layers.*.mlp"]


def test_fuse_modules_owns_all_weights_and_restores_exactly():
    model = tiny.causal_lm("llama")
    ref = copy.deepcopy(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    norm, mlp = model.model.layers[0].post_attention_layernorm, model.model.layers[0].mlp
    report = splice.fuse_modules(model, GLOBS)
    assert report.counts == {"chain": 2}
    layer = model.model.layers[0]
    assert isinstance(layer.mlp, FusedChain) and isinstance(layer.post_attention_layernorm, PassThrough)
    assert layer.mlp.post_attention_layernorm is norm and layer.mlp.mlp is mlp
    keys = set(model.state_dict())
    assert (
        "model.layers.0.mlp.post_attention_layernorm.weight" in keys
        and "model.layers.0.mlp.mlp.up_proj.weight" in keys
    )
    ids = tiny.token_ids()
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ref(ids).logits, rtol=0, atol=0)
    original = splice.original_state_dict(model)
    assert list(original) == list(before) and all(bitwise_equal(original[k], before[k]) for k in before)
    assert splice.unfuse_modules(model) == 2
    assert model.model.layers[0].mlp is mlp and model.model.layers[0].post_attention_layernorm is norm
    assert all(bitwise_equal(model.state_dict()[k], v) for k, v in before.items())


def test_renaming_keeps_parameter_objects():
    model = tiny.causal_lm("llama")
    weight = model.model.layers[1].mlp.down_proj.weight
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    splice.fuse_modules(model, GLOBS)
    assert (
        model.model.layers[1].mlp.mlp.down_proj.weight is weight
    )  # an optimizer made before fusing still works
    model(tiny.token_ids()).logits.sum().backward()
    optimizer.step()


def test_norm_mlp_family_is_chain_fusion_found_per_layer():
    model = tiny.causal_lm("gemma2")
    splice.fuse(model, ["norm_mlp"])
    layer = model.model.layers[0]
    assert layer.mlp.names == ("pre_feedforward_layernorm", "mlp")
    assert isinstance(layer.pre_feedforward_layernorm, PassThrough)
    assert not isinstance(layer.post_attention_layernorm, PassThrough)  # it closes the attention block


class Odd(nn.Module):
    """The MLP does not get the norm's output unchanged: these two cannot be fused."""

    def __init__(self):
        super().__init__()
        self.norm = nn.LayerNorm(8)
        self.mlp = nn.Linear(8, 8)

    def forward(self, x):
        return self.mlp(self.norm(x) * 2)


class Seq(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([Odd() for _ in range(2)])

    def forward(self, x):
        for b in self.blocks:
            x = b(x)
        return x


def test_non_adjacent_modules_are_refused_at_run_time():
    model = Seq()
    splice.fuse_modules(model, ["blocks.*.norm", "blocks.*.mlp"])
    with pytest.raises(FusionError, match="mlp did not receive the output of norm unchanged"):
        model(torch.randn(2, 8))


@pytest.mark.parametrize(
    "overrides, members",
    [
        (dict(intermediate_size=64), ("mlp.gate_proj", "mlp.up_proj")),  # square: up(gate(x)) would run
        ({}, ("mlp.gate_proj", "mlp.up_proj")),  # non-square: up(gate(x)) would be a shape error
        (dict(num_key_value_heads=4), ("self_attn.q_proj", "self_attn.k_proj")),
    ],
)
def test_parallel_siblings_are_refused_at_run_time(overrides, members):
    model = tiny.causal_lm("llama", **overrides)
    splice.fuse_modules(model, [f"model.layers.*.{m}" for m in members])
    first, second = (m.rpartition(".")[2] for m in members)
    with pytest.raises(
        FusionError,
        match=rf"^fused chain {first}\+{second}: {second} got the same input as {first} \(they are parallel "
        r"branches, not a chain\), so these modules are not adjacent and cannot be fused$",
    ):
        model(tiny.token_ids())


class Three(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm, self.up, self.down = nn.LayerNorm(8), nn.Linear(8, 12), nn.Linear(12, 8)

    def forward(self, x):
        return self.down(self.up(self.norm(x)))


def test_a_chain_of_three_hands_each_output_on():
    model = Three()
    ref = copy.deepcopy(model)
    splice.fuse_modules(model, ["norm", "up", "down"])
    x = torch.randn(2, 8)
    torch.testing.assert_close(model(x), ref(x), rtol=0, atol=0)


def test_a_runtime_layout_save_refuses_chains_before_writing(tmp_path):
    import transformers as T

    model = tiny.causal_lm("llama")
    ids = tiny.token_ids()
    with torch.no_grad():
        expected = model(ids).logits
    splice.fuse_modules(model, GLOBS)
    with pytest.raises(
        FusionError,
        match=r"^cannot save the runtime layout: fusion_config can only name registered families, and 'chain' came "
        r"from fuse_modules or a spec passed per call; save in the original layout \(the default\) or unfuse them first$",
    ):
        splice.save_pretrained(model, tmp_path / "runtime", save_original_format=False)
    assert not (tmp_path / "runtime").exists()
    out = splice.save_pretrained(model, tmp_path / "original")
    with torch.no_grad():
        reloaded = T.AutoModelForCausalLM.from_pretrained(out)(ids).logits
    torch.testing.assert_close(reloaded, expected, rtol=0, atol=0)


@pytest.mark.parametrize(
    "globs, message",
    [
        (["model.layers.*.post_attention_layernorm"], "at least two module globs"),
        (
            ["model.layers.*.post_attn_norm", "model.layers.*.mlp"],
            r"'model.layers.\*.post_attn_norm' matched no module; close module paths: \['model.layers.\*.post_attention_layernorm'",
        ),
        (["model.layers.*.self_attn.o_proj", "model.layers.*.mlp"], "must be siblings"),
        (["model.layers.*.mlp", "model.layers.0.mlp"], "has no partner"),
    ],
)
def test_chain_errors(globs, message):
    model = tiny.causal_lm("llama")
    with pytest.raises(FusionError, match=message):
        splice.fuse_modules(model, globs)


def test_kernels_plug_in_per_instance_and_fall_back():
    model = tiny.causal_lm("llama")
    ref = copy.deepcopy(model)
    other = copy.deepcopy(model)
    splice.fuse(model, ["gate_up"])
    splice.fuse_modules(model, GLOBS)
    splice.fuse_modules(other, GLOBS)
    ids = tiny.token_ids()
    calls = []

    def counting(chain, x):
        calls.append(chain)
        norm, mlp = (getattr(chain, n) for n in chain.names)
        return mlp(norm(x))

    assert use_kernel(model, counting) == 2
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ref(ids).logits, rtol=0, atol=0)
        assert len(calls) == 2
        other(ids)
        assert len(calls) == 2  # the other model's chains are untouched
    assert use_kernel(model, "rms_norm_gated_mlp") == 2
    assert "rms_norm_gated_mlp" in repr(model.model.layers[0].mlp)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ref(ids).logits, rtol=1e-5, atol=1e-5)
    use_kernel(model, None)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ref(ids).logits, rtol=0, atol=0)


def test_kernel_errors():
    model = tiny.causal_lm("llama")
    with pytest.raises(FusionError, match="no fused chain found"):
        use_kernel(model, "rms_norm_gated_mlp")
    splice.fuse_modules(model, GLOBS)
    with pytest.raises(
        FusionError,
        match=r"unknown kernel 'nope'; registered kernels: \['compiled', 'rms_norm_attention', 'rms_norm_gated_mlp'",
    ):
        use_kernel(model, "nope")
    register_kernel("test_never", lambda chain, x: x, matches=lambda chain: False, replace=True)
    with pytest.raises(
        FusionError, match="kernel 'test_never' cannot run the fused chain at model.layers.0.mlp"
    ):
        use_kernel(model, "test_never")
    with pytest.raises(FusionError, match="already registered"):
        register_kernel("test_never", lambda chain, x: x)


def test_kernel_given_to_fuse_modules():
    model = tiny.causal_lm("qwen2")
    ref = copy.deepcopy(model)
    splice.fuse_modules(model, GLOBS, kernel="rms_norm_gated_mlp")
    with torch.no_grad():
        torch.testing.assert_close(
            model(tiny.token_ids()).logits, ref(tiny.token_ids()).logits, rtol=1e-5, atol=1e-5
        )
