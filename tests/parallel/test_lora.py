"""LoRA factors under TP, over a simulated list of ranks: plain tensors, the real layout of a fused Llama.

At tp 4 the tiny Llama's 2 kv heads are replicated and its intermediate size of 90 is padded to 92, so
the adapter's B of k_proj must carry the same replicas and the B of gate_proj / A of down_proj the
same zero padding as their bases; consolidation must give the vanilla tensors back bit for bit.
"""

from __future__ import annotations

import pytest
import tiny
import torch
from pieces import shard

import splice
from splice.errors import SpliceError, WeightMapError
from splice.parallel.lora import consolidate_lora, lora_rules, peft_key, shard_lora
from splice.parallel.sharding import build_layout, model_plan, resolve_styles
from splice.transforms import bitwise_equal

TP, RANK, HIDDEN = 4, 8, 64
LAYER = "model.layers.0"
MODULES = [f"{LAYER}.self_attn.{n}_proj" for n in ("q", "k", "v", "o")] + [
    f"{LAYER}.mlp.{n}_proj" for n in ("gate", "up", "down")
]


@pytest.fixture(scope="module")
def setup():
    with torch.device("meta"):
        model = tiny.causal_lm("llama", intermediate_size=90)
    splice.fuse(model, {"qkv": True, "gate_up": True})
    layout = build_layout(model, resolve_styles(model, model_plan(model)), TP)
    g = torch.Generator().manual_seed(0)
    shapes = {
        "q": (64, 64),
        "k": (32, 64),
        "v": (32, 64),
        "o": (64, 64),
        "gate": (90, 64),
        "up": (90, 64),
        "down": (64, 90),
    }
    vanilla, base = {}, {}
    for module in MODULES:
        out, inp = shapes[module.rsplit(".", 1)[1].removesuffix("_proj")]
        vanilla[peft_key(module, "lora_A")] = torch.randn(RANK, inp, generator=g)
        vanilla[peft_key(module, "lora_B")] = torch.randn(out, RANK, generator=g)
        base[module] = torch.randn(out, inp, generator=g)
    return layout, vanilla, base


def test_factors_follow_their_base(setup):
    layout, vanilla, _ = setup
    _, dims = lora_rules(layout, MODULES)
    assert dims[peft_key(f"{LAYER}.self_attn.k_proj", "lora_B")] == 0  # column: B cut like the rows
    assert dims[peft_key(f"{LAYER}.mlp.down_proj", "lora_A")] == 1  # row: A cut like the columns
    assert peft_key(f"{LAYER}.self_attn.k_proj", "lora_A") not in dims  # replicated
    pieces = shard_lora(layout, vanilla, MODULES)
    k_b = peft_key(f"{LAYER}.self_attn.k_proj", "lora_B")
    assert [tuple(p[k_b].shape) for p in pieces] == [(16, RANK)] * 4  # 2 kv heads x 2 replicas / 4 ranks
    gate_b = peft_key(f"{LAYER}.mlp.gate_proj", "lora_B")
    assert [tuple(p[gate_b].shape) for p in pieces] == [(23, RANK)] * 4  # 90 padded to 92
    assert not pieces[3][gate_b][-2:].any()


def test_each_rank_adds_its_rows_of_the_update(setup):
    """Base + LoRA per rank equals the rows of the unsharded (W + BA) x that the rank holds."""
    layout, vanilla, base = setup
    pieces = shard_lora(layout, vanilla, MODULES)
    x = torch.randn(3, HIDDEN, generator=torch.Generator().manual_seed(1))

    k = f"{LAYER}.self_attn.k_proj"
    a, b = vanilla[peft_key(k, "lora_A")], vanilla[peft_key(k, "lora_B")]
    full = x @ (base[k] + b @ a).T
    base_global = torch.cat([base[k][h * 16 : (h + 1) * 16] for h in (0, 0, 1, 1)])  # kv heads replicated
    for rank, (w, local) in enumerate(zip(shard(base_global, 0, TP), pieces)):
        out = x @ w.T + (x @ local[peft_key(k, "lora_A")].T) @ local[peft_key(k, "lora_B")].T
        head = rank // 2
        torch.testing.assert_close(out, full[:, head * 16 : (head + 1) * 16])

    down = f"{LAYER}.mlp.down_proj"
    h = torch.randn(3, 90, generator=torch.Generator().manual_seed(2))
    a, b = vanilla[peft_key(down, "lora_A")], vanilla[peft_key(down, "lora_B")]
    h_padded = torch.cat([h, h.new_zeros(3, 2)], 1)
    total = sum(
        (h_r @ local[peft_key(down, "lora_A")].T) @ local[peft_key(down, "lora_B")].T
        for h_r, local in zip(shard(h_padded, 1, TP), pieces)
    )
    torch.testing.assert_close(total, h @ a.T @ b.T)


def test_consolidation_is_exact_and_refuses_what_would_be_lost(setup):
    layout, vanilla, _ = setup
    pieces = shard_lora(layout, vanilla, MODULES)
    back = consolidate_lora(layout, pieces, MODULES)
    assert back.keys() == vanilla.keys()
    assert all(bitwise_equal(back[k], v) for k, v in vanilla.items())

    k_b = peft_key(f"{LAYER}.self_attn.k_proj", "lora_B")
    drifted = [dict(p) for p in pieces]
    drifted[1][k_b] = drifted[1][k_b] + 1  # rank 1's replica of kv head 0 trained apart
    with pytest.raises(WeightMapError, match="copy 1 of block 0 differs"):
        consolidate_lora(layout, drifted, MODULES)

    q_a = peft_key(f"{LAYER}.self_attn.q_proj", "lora_A")
    drifted = [dict(p) for p in pieces]
    drifted[2][q_a] = drifted[2][q_a] * 2
    with pytest.raises(SpliceError, match=r"q_proj\.lora_A\.weight is replicated, but rank 2's copy differs"):
        consolidate_lora(layout, drifted, MODULES)

    down_a = peft_key(f"{LAYER}.mlp.down_proj", "lora_A")
    dirty = [dict(p) for p in pieces]
    dirty[3][down_a] = dirty[3][down_a].clone()
    dirty[3][down_a][:, -1] = 1.0  # a padded input column of down_proj
    with pytest.raises(WeightMapError, match="padding past index 90 .* non-zero"):
        consolidate_lora(layout, dirty, MODULES)
