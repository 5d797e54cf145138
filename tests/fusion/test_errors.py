"""Bad requests get clear errors naming the culprit, and a refused request changes nothing."""

from __future__ import annotations

import pytest
import tiny
import torch
from torch import nn

import splice
from splice.errors import FusionError
from splice.fusion import get_state
from splice.transforms import bitwise_equal


def state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def unchanged(model, before, modules):
    assert get_state(model) is None
    assert list(model.state_dict()) == list(before)
    assert all(bitwise_equal(model.state_dict()[k], v) for k, v in before.items())
    assert all(a is b for a, b in zip(model.modules(), modules))


@pytest.mark.parametrize(
    "config, message",
    [
        (
            ["qvk"],
            r"unknown fusion family 'qvk' \(did you mean 'qkv'\?\); known families: gate_up, norm_mlp, patch_embeddings, qkv, qkv_split",
        ),
        (
            {"qkv": {"modulez": "x"}},
            r"'qkv': unknown option 'modulez' \(did you mean 'modules'\?\); options are \['fused_name', 'modules', 'names'\]",
        ),
        ({"qkv": {"modules": "("}}, r"'qkv': option modules='\(' is not a valid regex"),
        (
            {"qkv": {"modules": r"decoder\.blocks"}},
            r"'qkv': option modules='decoder\\\\.blocks' matched no module; fusable modules include \['model.layers.0.self_attn', 'model.layers.1.self_attn'\]",
        ),
        (
            {"qkv": {"names": ["query", "key", "value"]}},
            r"'qkv': found no modules with nn.Linear children named query/key/value",
        ),
        (
            ["patch_embeddings"],
            r"'patch_embeddings': found no modules holding an nn.Conv2d/nn.Conv3d with stride == kernel_size",
        ),
        ({"qkv": "yes"}, r"'qkv': options must be True or a dict, got 'yes'"),
        ({"qkv": {"names": "q_proj"}}, r"'qkv': option names must be a list of strings, got 'q_proj'"),
        ({"qkv": {"modules": 3}}, r"'qkv': option modules must be a string, got 3"),
        ({"qkv_split": {"name": "qkv", "sizes": [8, "8", 8]}}, r"option sizes must be a list of ints"),
        ({"qkv_split": {"names": ["a", "b", "c"]}}, r"option names needs option name"),
        ([], "enables no family"),
        (42, "a fusion config is a list of family names or a dict, got int"),
    ],
)
def test_bad_requests_name_the_culprit_and_change_nothing(config, message):
    model = tiny.causal_lm("llama")
    before, modules = state(model), list(model.modules())
    with pytest.raises(FusionError, match=message):
        splice.fuse(model, config)
    unchanged(model, before, modules)


def test_a_later_family_failing_rolls_back_the_earlier_ones():
    model = tiny.causal_lm("llama")
    before, modules = state(model), list(model.modules())
    with pytest.raises(FusionError, match="'patch_embeddings': found no"):
        splice.fuse(model, ["qkv", "gate_up", "patch_embeddings"])
    unchanged(model, before, modules)


class RoundedLinear(nn.Linear):
    """An nn.Linear subclass whose forward is not nn.Linear's (as a quantized Linear's is not)."""

    def forward(self, x):
        return super().forward(x).round()


def test_near_misses_say_why_a_module_is_not_fusable():
    model = tiny.causal_lm("llama")
    model.model.layers[0].self_attn.k_proj = RoundedLinear(64, 32)
    model.model.layers[1].self_attn.k_proj = RoundedLinear(64, 32)
    with pytest.raises(
        FusionError,
        match=r"e\.g\. model\.layers\.0\.self_attn is not fusable: k_proj is a test_errors\.RoundedLinear, "
        r"an nn\.Linear subclass with its own forward",
    ):
        splice.fuse(model, ["qkv"])


def test_tied_weights_are_not_silently_untied():
    model = tiny.causal_lm("llama")
    attn = model.model.layers[0].self_attn
    model.model.layers[1].self_attn.v_proj.weight = attn.v_proj.weight  # shared between two layers
    with pytest.raises(FusionError, match=r"v_proj.weight is shared with another module \(tied weights\)"):
        splice.fuse(model, ["qkv"])


def test_hooks_on_replaced_modules_are_refused():
    model = tiny.causal_lm("llama")
    model.model.layers[1].mlp.up_proj.register_forward_hook(lambda *a: None)
    with pytest.raises(FusionError, match="'gate_up' at model.layers.1.mlp: up_proj has forward hooks"):
        splice.fuse(model, ["gate_up"])


def test_mixed_requires_grad_is_refused():
    model = tiny.causal_lm("llama")
    model.model.layers[0].self_attn.q_proj.weight.requires_grad_(False)
    with pytest.raises(FusionError, match="disagree on requires_grad"):
        splice.fuse(model, ["qkv"])


def test_fusing_a_family_again_needs_the_same_options():
    model = tiny.causal_lm("llama")
    splice.fuse(model, {"qkv": {"modules": r"layers\.0\."}})
    before, modules = state(model), list(model.modules())
    with pytest.raises(
        FusionError,
        match=r"^'qkv' is already fused with options \{'modules': 'layers\\\\.0\\\\.'\}, not options "
        r"\{'modules': 'layers\\\\.1\\\\.'\}; a model records one set of options per family: pass one config "
        r"covering all its modules, or unfuse\(model, family='qkv'\) first$",
    ):
        splice.fuse(model, {"gate_up": True, "qkv": {"modules": r"layers\.1\."}})
    assert list(model.state_dict()) == list(before)  # nothing changed, gate_up included
    assert all(a is b for a, b in zip(model.modules(), modules))
    assert get_state(model).config == {"qkv": {"modules": r"layers\.0\."}}

    # fusing the same family again with the same options fuses nothing new: every module it claims is fused
    with pytest.raises(
        FusionError,
        match=r"^'qkv' is already fused in this model \(1 module\(s\), e.g. model.layers.0.self_attn\) and nothing is left to fuse",
    ):
        splice.fuse(model, {"qkv": {"modules": r"layers\.0\."}})


def test_unfuse_errors():
    model = tiny.causal_lm("llama")
    with pytest.raises(FusionError, match="nothing fused by splice"):
        splice.unfuse(model)
    splice.fuse(model, ["qkv"])
    with pytest.raises(FusionError, match=r"no 'gate_up' fusion on this model; fused families: \['qkv'\]"):
        splice.unfuse(model, family="gate_up")


def test_requires_grad_survives_a_round_trip():
    model = tiny.causal_lm("llama")
    for p in model.model.layers[0].parameters():
        p.requires_grad_(False)
    splice.fuse(model, ["qkv", "gate_up"])
    assert not model.model.layers[0].self_attn.qkv_proj.weight.requires_grad
    assert model.model.layers[1].self_attn.qkv_proj.weight.requires_grad
    splice.unfuse(model)
    assert not model.model.layers[0].self_attn.k_proj.weight.requires_grad
    assert model.model.layers[1].self_attn.k_proj.weight.requires_grad


def test_fusing_leaks_nothing_into_classes_or_other_models():
    from transformers.models.llama import modeling_llama as ml

    forwards = {
        cls: cls.__dict__.get("forward") for cls in (ml.LlamaAttention, ml.LlamaMLP, ml.LlamaDecoderLayer)
    }
    attrs = {cls: set(vars(cls)) for cls in forwards}
    model = tiny.causal_lm("llama")
    splice.fuse(model, ["qkv", "gate_up", "norm_mlp"])
    other = tiny.causal_lm("llama")
    assert type(other.model.layers[0].self_attn.q_proj) is nn.Linear and get_state(other) is None
    for cls, forward in forwards.items():
        assert cls.__dict__.get("forward") is forward and set(vars(cls)) == attrs[cls]
    assert all(type(m).__module__.startswith(("torch", "transformers")) for m in other.modules())


def test_fusing_two_models_in_two_threads():
    import threading

    models = [tiny.causal_lm("llama", seed=1), tiny.causal_lm("llama", seed=2)]
    expected = []
    ids = tiny.token_ids()
    with torch.no_grad():
        expected = [m(ids).logits for m in models]
    configs = [["qkv", "gate_up"], ["norm_mlp"]]
    errors = []

    def work(model, config, want):
        try:
            for _ in range(5):
                splice.fuse(model, config)
                with torch.no_grad():
                    torch.testing.assert_close(model(ids).logits, want, rtol=0, atol=1e-5)
                splice.unfuse(model)
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=a) for a in zip(models, configs, expected)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert not errors, errors


def test_unfuse_refuses_to_drop_a_wrapper_put_over_a_fused_module():
    model = tiny.causal_lm("llama")
    splice.fuse(model, ["qkv", "gate_up"])
    attn = model.model.layers[1].self_attn

    class Wrapper(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            return self.inner(x)

    attn.v_proj = Wrapper(attn.v_proj)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(
        FusionError,
        match=r"'qkv' at model.layers.1.self_attn: v_proj is now a Wrapper, not what splice installed",
    ):
        splice.unfuse(model)
    after = model.state_dict()
    assert list(after) == list(before) and all(bitwise_equal(after[k], v) for k, v in before.items())
    assert hasattr(model.model.layers[0].self_attn, "qkv_proj")  # nothing was undone
