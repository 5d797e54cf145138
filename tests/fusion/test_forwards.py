"""Fused forwards (`splice.fusion.forwards`): one qkv_proj / gate_up_proj call per module, exactly.

Every recognized family is compared with the unfused model on the same weights: logits (padding mask,
no cache), attention weights (`output_attentions`), greedy tokens with a dynamic and a static cache, and
gradients. The fallbacks are checked by what they must preserve: a LoRA layer's contribution, a hook's
calls, an unrecognized forward, a second model left alone.
"""

from __future__ import annotations

import copy
import functools

import peft
import pytest
import tiny
import torch
import transformers as T
from peft import LoraConfig

import splice
from splice.fusion import forwards

SMALL_WINDOW = dict(sliding_window=4)


def gemma3_text(**overrides):
    torch.manual_seed(0)
    config = T.Gemma3TextConfig(**{**tiny.TEXT, "head_dim": 16, "sliding_window": 4, **overrides})
    return T.Gemma3ForCausalLM(config).eval()


MODELS = {
    "llama": lambda: tiny.causal_lm("llama"),
    "mistral": lambda: tiny.causal_lm("mistral", **SMALL_WINDOW),
    "qwen2": lambda: tiny.causal_lm("qwen2", use_sliding_window=True, **SMALL_WINDOW),
    "qwen3": lambda: tiny.causal_lm("qwen3"),
    "gemma": lambda: tiny.causal_lm("gemma"),
    "gemma2": lambda: tiny.causal_lm(
        "gemma2", **SMALL_WINDOW
    ),  # softcapping; transformers has no sdpa for it
    "gemma3": gemma3_text,
    "qwen2_vl": tiny.qwen2_vl,  # a VLM's text model: other argument order, mrope
}
CASES = [
    (k, impl) for k in MODELS for impl in ("eager", "sdpa") if (k, impl) != ("gemma2", "sdpa")
]  # Gemma 2 has no sdpa


def fused_pair(kind, impl="eager"):
    model = MODELS[kind]()
    model.set_attn_implementation(impl)
    ref = copy.deepcopy(model)
    splice.fuse(model, ["qkv", "gate_up"])
    return ref, model


def swapped(model):
    return [p for p, m in model.named_modules() if forwards.installed(m)]


def padded_batch():
    ids = tiny.token_ids(batch=2, length=9)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding on the second row
    return ids, mask


def generate(model, prompt, **kwargs):
    return model.generate(prompt, max_new_tokens=12, min_new_tokens=12, do_sample=False, **kwargs)


@pytest.mark.parametrize("kind, impl", CASES, ids=[f"{k}-{i}" for k, i in CASES])
def test_fused_forward_is_exact(kind, impl):
    ref, model = fused_pair(kind, impl)
    layers = model.config.get_text_config().num_hidden_layers
    assert len(swapped(model)) == 2 * layers  # every attention and every MLP runs fused
    ids, mask = padded_batch()
    with torch.no_grad():
        expected, actual = ref(ids, attention_mask=mask), model(ids, attention_mask=mask)
        torch.testing.assert_close(actual.logits, expected.logits, rtol=0, atol=1e-5)
        no_cache = model(ids, attention_mask=mask, use_cache=False).logits
        torch.testing.assert_close(no_cache, expected.logits, rtol=0, atol=1e-5)
    prompt = ids[:1, :5]
    assert torch.equal(generate(model, prompt), generate(ref, prompt))
    static = dict(cache_implementation="static")
    assert torch.equal(generate(model, prompt, **static), generate(ref, prompt, **static))


def test_rotary_embedding_of_q_and_k_runs_as_one_where_there_is_no_qk_norm():
    """The joint rotation is the default path, so the exactness tests above cover it; q/k norms keep them apart."""
    for kind in MODELS:
        _, model = fused_pair(kind)
        attention = next(m for m in model.modules() if forwards.installed(m) and hasattr(m, "qkv_proj"))
        assert attention.forward.args[0].rotate_qk_together is (kind not in ("qwen3", "gemma3")), kind


@pytest.mark.parametrize("kind", ["llama", "qwen3", "gemma2", "gemma3"])
def test_output_attentions(kind):
    ref, model = fused_pair(kind, "eager")
    ids, mask = padded_batch()
    with torch.no_grad():
        expected = ref(ids, attention_mask=mask, output_attentions=True).attentions
        actual = model(ids, attention_mask=mask, output_attentions=True).attentions
    assert len(actual) == len(expected) == 2
    for a, e in zip(actual, expected):
        torch.testing.assert_close(a, e, rtol=0, atol=1e-6)


def test_gradients_match():
    ref, model = fused_pair("qwen3")
    ids = tiny.token_ids()
    for m in (ref, model):
        m.train()
        m(ids, labels=ids).loss.backward()
    original = (
        splice.fusion.get_state(model)
        .weight_map()
        .invert()
        .to_runtime({k: p.grad for k, p in model.named_parameters()})
    )
    for key, param in ref.named_parameters():
        torch.testing.assert_close(original[key], param.grad, rtol=1e-4, atol=1e-6, msg=key)


def test_lora_falls_back_and_matches_vanilla_peft():
    config = dict(r=4, lora_alpha=8, init_lora_weights=False, target_modules=["q_proj", "v_proj", "up_proj"])
    ref, model = fused_pair("llama")
    torch.manual_seed(1)
    vanilla = peft.get_peft_model(ref, LoraConfig(**config))
    torch.manual_seed(1)
    fused = splice.peft.get_peft_model(model, LoraConfig(**config))
    calls = []
    original = forwards.plain_fused_linear

    def spy(module, names):
        found = original(module, names)
        calls.append(found)
        return found

    ids = tiny.token_ids()
    forwards.plain_fused_linear = spy
    try:
        with torch.no_grad():
            actual = fused(ids).logits
    finally:
        forwards.plain_fused_linear = original
    assert calls and all(found is None for found in calls)  # every projection with a LoRA fell back
    with torch.no_grad():
        torch.testing.assert_close(actual, vanilla(ids).logits, rtol=0, atol=1e-5)


def test_hook_on_a_slice_still_fires():
    ref, model = fused_pair("llama")
    seen = []
    attention = model.model.layers[0].self_attn
    handle = attention.q_proj.register_forward_hook(lambda mod, args, out: seen.append(out.shape))
    ids = tiny.token_ids()
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ref(ids).logits, rtol=0, atol=1e-5)
    assert seen == [torch.Size([2, 9, 64])]
    handle.remove()
    hooked = model.model.layers[1].mlp.gate_up_proj.register_forward_hook(lambda *a: seen.append("gate_up"))
    with torch.no_grad():
        model(ids)
    assert seen[1:] == ["gate_up"]
    hooked.remove()


def test_unfuse_restores_the_forward_and_nothing_else_changes():
    plain = tiny.causal_lm("llama")
    ids = tiny.token_ids()
    with torch.no_grad():
        plain_logits = plain(ids).logits
    ref, model = fused_pair("llama")
    assert not swapped(plain)
    assert all("forward" not in m.__dict__ for m in plain.modules())  # a second model is untouched
    assert type(plain.model.layers[0].self_attn).forward is type(ref.model.layers[0].self_attn).forward
    with torch.no_grad():
        torch.testing.assert_close(plain(ids).logits, plain_logits, rtol=0, atol=0)
    splice.unfuse(model)
    assert all("forward" not in m.__dict__ for m in model.modules())
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ref(ids).logits, rtol=0, atol=0)


def test_phi3_ships_fused_projections_and_keeps_its_forward():
    """Phi-3's own forward already runs one qkv_proj and one gate_up_proj: nothing to swap, even when split."""
    model = tiny.causal_lm("phi3")
    ref = copy.deepcopy(model)
    with pytest.raises(splice.FusionError, match="'qkv': found no modules with nn.Linear children"):
        splice.fuse(model, ["qkv"])
    splice.fuse(model, ["qkv_split"])
    assert not swapped(model)
    ids = tiny.token_ids()
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ref(ids).logits, rtol=0, atol=1e-5)


def test_unrecognized_forward_keeps_the_slices():
    class MyAttention(T.models.llama.modeling_llama.LlamaAttention):
        def forward(self, hidden_states, **kwargs):  # not a forward splice knows
            return super().forward(hidden_states, **kwargs)

    class SameForward(T.models.llama.modeling_llama.LlamaAttention):
        pass  # inherits LlamaAttention.forward: recognized by its source, whatever the class name

    model = tiny.causal_lm("llama")
    config = model.config
    layers = model.model.layers
    for index, cls in enumerate((MyAttention, SameForward)):
        replacement = cls(config, index)
        replacement.load_state_dict(layers[index].self_attn.state_dict())
        layers[index].self_attn = replacement
    ref = copy.deepcopy(model)
    splice.fuse(model, ["qkv"])
    assert swapped(model) == ["model.layers.1.self_attn"]
    ids = tiny.token_ids()
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ref(ids).logits, rtol=0, atol=1e-5)


def test_fingerprint_ignores_comments_and_annotations_only():
    class A:
        def forward(self, x: int) -> int:
            """doc"""
            return x + 1  # one

    class B:
        def forward(self, x):
            return x + 1

    class C:
        def forward(self, x):
            return x + 2

    assert (
        forwards.fingerprint(A.forward) == forwards.fingerprint(B.forward) != forwards.fingerprint(C.forward)
    )
    wrapper = functools.wraps(B.forward)(lambda self, x: x)
    assert forwards.fingerprint(wrapper) is None  # a wrapper is not its source


def test_deepcopy_binds_the_copy():
    _, model = fused_pair("llama")
    clone = copy.deepcopy(model)
    attention = clone.model.layers[0].self_attn
    assert attention.forward.args[-1] is attention
    ids = tiny.token_ids()
    with torch.no_grad():
        torch.testing.assert_close(clone(ids).logits, model(ids).logits, rtol=0, atol=0)


# --------------------------------------------------------------------------------------------------
# kernels on top: norm + attention and norm + MLP chains


def with_kernels(model):
    splice.fuse(model, ["norm_mlp"])
    splice.kernels.use_kernel(model, "rms_norm_gated_mlp")
    globs = ["model.layers.*.input_layernorm", "model.layers.*.self_attn"]
    splice.fuse_modules(model, globs, kernel="rms_norm_attention")
    return model


def count_ops(model, *args, **kwargs):
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        ops = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Count.ops += 1
            return func(*args, **(kwargs or {}))

    with Count():
        model(*args, **kwargs)
    return Count.ops


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_norm_kernels_are_exact_and_cut_ops(impl):
    ref, model = fused_pair("llama", impl)
    fused = copy.deepcopy(model)
    with_kernels(model)
    assert {c.kernel_name for c in model.modules() if isinstance(c, splice.fusion.FusedChain)} == {
        "rms_norm_attention",
        "rms_norm_gated_mlp",
    }
    ids, mask = padded_batch()
    with torch.inference_mode():
        torch.testing.assert_close(
            model(ids, attention_mask=mask).logits, ref(ids, attention_mask=mask).logits, rtol=0, atol=1e-5
        )
        step = ids[:1, :1]
        ops = [count_ops(m, step) for m in (ref, fused, model)]
    assert (
        ops[0] > ops[1] > ops[2]
    )  # each layer of fusion removes dispatched ops (bench_decode has the ratios)
    prompt = ids[:1, :5]
    assert torch.equal(generate(model, prompt), generate(ref, prompt))


def test_norm_kernel_runs_a_hooked_norm():
    ref, model = fused_pair("llama")
    with_kernels(model)
    seen = []
    norm = model.model.layers[0].self_attn.input_layernorm
    norm.register_forward_hook(lambda *a: seen.append("norm"))
    ids = tiny.token_ids()
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ref(ids).logits, rtol=0, atol=1e-5)
    assert seen == ["norm"]


@pytest.mark.parametrize(
    "extra", [with_kernels, splice.kernels.use_column_major], ids=["kernels", "column-major"]
)
def test_compiled_fused_model_has_no_graph_break_and_no_recompile(extra):
    import torch._dynamo

    _, model = fused_pair("llama")
    extra(model)
    ids = tiny.token_ids(batch=1, length=5)

    def decode(m, steps=4):
        cache = T.StaticCache(config=model.config, max_cache_len=16)
        token = m(ids, past_key_values=cache).logits[:, -1:].argmax(-1)
        tokens = []
        for position in range(5, 5 + steps):
            if (
                position == 6 and m is not model
            ):  # compiled: from the second decoding step on, nothing recompiles
                torch._dynamo.config.error_on_recompile = True
            out = m(token, past_key_values=cache, cache_position=torch.tensor([position]))
            token = out.logits[:, -1:].argmax(-1)
            tokens.append(token.item())
        return tokens

    torch._dynamo.reset()
    try:
        with torch.no_grad():
            expected = decode(model)
            cache = T.StaticCache(config=model.config, max_cache_len=16)
            model(ids, past_key_values=cache)
            explained = torch._dynamo.explain(model)(
                ids[:, :1], past_key_values=cache, cache_position=torch.tensor([5])
            )
            assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons
            torch._dynamo.reset()
            assert decode(torch.compile(model, backend="eager")) == expected
    finally:
        torch._dynamo.config.error_on_recompile = False
        torch._dynamo.reset()


def test_norm_kernels_refuse_a_norm_they_do_not_know():
    """Gemma's RMSNorm scales by (1 + weight): a different forward, so the Llama RMSNorm kernel refuses it."""
    model = tiny.causal_lm("gemma")
    globs = ["model.layers.*.input_layernorm", "model.layers.*.self_attn"]
    with pytest.raises(
        splice.FusionError,
        match=r"kernel 'rms_norm_attention' cannot run the fused chain at model\.layers\.0\.self_attn "
        r"\(input_layernorm\+self_attn\)",
    ):
        splice.fuse_modules(model, globs, kernel="rms_norm_attention")
