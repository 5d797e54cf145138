"""`norm_mlp` proves, from the layer's forward source, that the norm's output feeds only the MLP (`splice.fusion.adjacency`)."""

from __future__ import annotations

import pytest
import torch
import transformers as T
from arch_sweep import tiny_config
from torch import nn

import splice
from splice.errors import FusionError
from splice.fusion.adjacency import why_not_chain


class Norm(nn.LayerNorm):
    def __init__(self):
        super().__init__(8)


class Layer(nn.Module):
    def __init__(self):
        super().__init__()
        self.post_attention_layernorm = Norm()
        self.mlp = nn.Linear(8, 8)

    def forward(self, hidden_states):  # Llama
        residual = hidden_states
        hidden_states = self.post_attention_layernorm(hidden_states)
        hidden_states = self.mlp(hidden_states)
        return residual + hidden_states


class ResidualFromNorm(Layer):
    def forward(self, hidden_states):  # MiniMax
        hidden_states = self.post_attention_layernorm(hidden_states)
        residual = hidden_states
        hidden_states = self.mlp(hidden_states)
        return residual + hidden_states


class PostNorm(Layer):
    def forward(self, hidden_states, attn_out):  # OLMo 2, EXAONE 4
        residual = hidden_states
        hidden_states = self.post_attention_layernorm(attn_out)
        hidden_states = residual + hidden_states
        return self.mlp(hidden_states)


class ReadsNormWeight(Layer):
    def forward(self, hidden_states):  # Zaya
        hidden_states = self.post_attention_layernorm(
            hidden_states.to(self.post_attention_layernorm.weight.dtype)
        )
        return self.mlp(hidden_states)


class ReadAfterMLP(Layer):
    def forward(self, hidden_states):
        normed = self.post_attention_layernorm(hidden_states)
        out = self.mlp(normed)
        return out + normed


class InALoop(Layer):
    def forward(self, hidden_states):
        for _ in range(2):
            hidden_states = self.post_attention_layernorm(hidden_states)
        return self.mlp(hidden_states)


class OtherMethod(Layer):
    def scale(self):
        return self.mlp.weight.norm()


@pytest.mark.parametrize(
    ("layer", "message"),
    [
        (ResidualFromNorm, r"the output of self\.post_attention_layernorm \(hidden_states\) is used by `residual = hidden_states` before self\.mlp"),
        (PostNorm, r"is used by `hidden_states = residual \+ hidden_states` before self\.mlp"),
        (ReadsNormWeight, r"ReadsNormWeight\.forward refers to self\.post_attention_layernorm 2 times"),
        (ReadAfterMLP, r"\(normed\) is read again by `return out \+ normed` after self\.mlp"),
        (InALoop, r"self\.mlp is not called after self\.post_attention_layernorm in the same block"),
        (OtherMethod, r"OtherMethod\.scale refers to self\.mlp"),
    ],
)  # fmt: skip
def test_not_adjacent_is_explained(layer, message):
    assert why_not_chain(Layer(), ("post_attention_layernorm", "mlp")) is None
    why = why_not_chain(layer(), ("post_attention_layernorm", "mlp"))
    assert why is not None and __import__("re").search(message, why), why
    model = nn.ModuleDict({"layer": layer()})
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(
        FusionError,
        match=r"'norm_mlp' at layer: post_attention_layernorm cannot be absorbed into mlp: .*" + message,
    ):
        splice.fuse(model, ["norm_mlp"])
    assert isinstance(model["layer"].post_attention_layernorm, Norm)  # refused before changing anything
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize(
    ("model_type", "message"),
    [
        ("minimax", r"'norm_mlp' at model\.layers\.0: .*`residual = hidden_states` before self\.mlp"),
        (
            "olmo2",
            r"'norm_mlp' at model\.layers\.0: .*`hidden_states = residual \+ hidden_states` before self\.mlp",
        ),
        ("zaya", r"'norm_mlp' at model\.layers\.0: .*refers to self\.post_attention_layernorm 2 times"),
    ],
)
def test_transformers_layouts_refused_at_load(tmp_path, model_type, message):
    torch.manual_seed(0)
    T.AutoModelForCausalLM.from_config(tiny_config(model_type)).save_pretrained(tmp_path)
    with pytest.raises(FusionError, match=message):
        splice.from_pretrained(T.AutoModelForCausalLM, tmp_path, fusion_config={"norm_mlp": True})


class Attention(nn.Module):
    def __init__(self):
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj = nn.Linear(8, 8), nn.Linear(8, 4), nn.Linear(8, 4)

    def forward(self, x):
        return self.q_proj(x).sum() + self.k_proj(x).sum() + self.v_proj(x).sum()


class Block(nn.Module):
    """Rebuilds its attention, carrying the projections over by name, as BigBird's set_attention_type does."""

    def __init__(self):
        super().__init__()
        self.attn = Attention()

    def rebuild(self):
        new = Attention()
        new.q_proj = self.attn.q_proj
        self.attn = new

    def forward(self, x):
        return self.attn(x)


def test_children_carried_over_by_name_are_refused():
    model = Block()
    with pytest.raises(
        FusionError,
        match=r"'qkv' at attn: Block\.rebuild moves q_proj onto another module \(`new\.q_proj = self\.attn\.q_proj`\), "
        r"which would leave the fused module behind",
    ):
        splice.fuse(model, ["qkv"])
    assert type(model.attn.q_proj) is nn.Linear


def test_big_bird_is_refused_at_load(tmp_path):
    torch.manual_seed(0)
    T.AutoModelForCausalLM.from_config(tiny_config("big_bird")).save_pretrained(tmp_path)
    with pytest.raises(
        FusionError, match=r"BigBirdAttention\.set_attention_type moves query onto another module"
    ):
        splice.from_pretrained(T.AutoModelForCausalLM, tmp_path, fusion_config={"qkv": True})


class Nested(Layer):
    def forward(self, hidden_states):  # DeepSeek-V4: the norm's call is the MLP's argument
        return hidden_states + self.mlp(self.post_attention_layernorm(hidden_states))


def test_nested_call_is_adjacent():
    model = nn.ModuleDict({"layer": Nested()})
    x = torch.randn(2, 8)
    expected = model["layer"](x)
    assert why_not_chain(model["layer"], ("post_attention_layernorm", "mlp")) is None
    splice.fuse(model, ["norm_mlp"])
    torch.testing.assert_close(model["layer"](x), expected, rtol=0, atol=0)


class ParallelResidual(Layer):
    def __init__(self, parallel: bool):
        super().__init__()
        self.use_parallel_residual = parallel

    def forward(self, hidden_states, attn_out):  # GPT-NeoX: the layout is a flag fixed at build time
        if self.use_parallel_residual:
            return hidden_states + attn_out + self.mlp(self.post_attention_layernorm(hidden_states))
        attn_out = attn_out + hidden_states
        return self.mlp(self.post_attention_layernorm(attn_out)) + attn_out


def test_branches_on_flags_are_taken_as_the_instance_takes_them():
    for parallel in (True, False):
        layer = ParallelResidual(parallel)
        assert why_not_chain(layer, ("post_attention_layernorm", "mlp")) is None
        x, a = torch.randn(2, 8), torch.randn(2, 8)
        expected = layer(x, a)
        model = nn.ModuleDict({"layer": layer})
        splice.fuse(model, ["norm_mlp"])
        torch.testing.assert_close(model["layer"](x, a), expected, rtol=0, atol=0)
