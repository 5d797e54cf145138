"""What each rank does in the LoRA-under-TP tests. One spawn per world size; the parent checks the results.

Every rank seeds like the one-process reference, so ``splice.peft.get_peft_model`` must draw the same
initial factors; then it trains, saves (collective, rank 0 writes), and loads the adapters back.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import ranks
import torch

PRELOAD = [
    "torch",
    "torch.distributed.tensor.parallel",
    "transformers",
    "transformers.models.llama.modeling_llama",
    "peft",
    "splice.hf",
    "splice.parallel.load",
    "splice.peft",
    "splice.peft.tensor_parallel",
    "tiny",
]

SEED = 1234
MAX_NORM = 0.05  # below the gradient norms of these runs, so clipping acts
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def spawn(scenario: str, world: int, workdir: Path, **options: Any) -> list[dict[str, Any]]:
    return ranks.spawn(sys.modules[__name__], scenario, world, workdir, **options)


def lora_config():
    import peft

    return peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=TARGETS)


def optimizer(name: str, params):
    if name == "sgd":
        return torch.optim.SGD(params, lr=0.5)
    # Adam's first steps move each element by about lr * sign(g): an element whose gradient is near round-off
    # moves by chance, by up to a fraction of lr. lr and eps keep that below the tests' 1e-5 (SGD has no such
    # amplification and runs at a large lr)
    return torch.optim.AdamW(params, lr=2e-3, weight_decay=0.1, eps=1e-6)


def train(model, ids: torch.Tensor, opt: str, steps: int, clip=None) -> list[torch.Tensor]:
    """``steps`` optimizer steps on a causal-LM loss, gradients clipped; each step's loss and gradient norm.

    ``clip(model, max_norm)`` clips (default: torch's ``clip_grad_norm_`` over the trainable parameters).
    """
    params = [p for p in model.parameters() if p.requires_grad]
    optim = optimizer(opt, params)
    model.train()
    losses = []
    for _ in range(steps):
        optim.zero_grad()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        if clip is None:
            norm = torch.nn.utils.clip_grad_norm_(params, MAX_NORM)
        else:
            norm = clip(model, MAX_NORM)
        optim.step()
        norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm
        losses.append(torch.stack([loss.detach(), norm.detach()]))
    return losses


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids).logits


def splice_clip(peft_model, max_norm: float) -> torch.Tensor:
    """splice's clipping for TP models, which counts replicated kv rows once (torch's counts every copy)."""
    from splice.parallel import clip_grad_norm_

    return clip_grad_norm_(peft_model, max_norm)  # the PeftModel: it finds the TP model inside


# --------------------------------------------------------------------------------------------------
# scenarios


def lora(
    rank: int,
    world: int,
    workdir: Path,
    *,
    source: str,
    ids: torch.Tensor,
    opt: str,
    steps: int,
    fusion: dict,
    clip: str,
) -> dict:
    from torch.distributed.tensor import DTensor
    from transformers import AutoModelForCausalLM

    import splice

    tag = f"{world}-{'fused' if fusion else 'unfused'}"
    out: dict[str, Any] = {}
    model = splice.from_pretrained(AutoModelForCausalLM, source, fusion_config=fusion, tp_plan="auto")
    torch.manual_seed(SEED)
    peft_model = splice.peft.get_peft_model(model, lora_config())
    attention = peft_model.base_model.model.model.layers[0].self_attn
    mlp = peft_model.base_model.model.model.layers[0].mlp
    out["placements"] = {
        name: (
            type(layer.lora_A["default"].weight).__name__,
            tuple(map(repr, layer.lora_A["default"].weight.placements)),
            tuple(layer.lora_A["default"].weight.to_local().shape),
            tuple(map(repr, layer.lora_B["default"].weight.placements)),
            tuple(layer.lora_B["default"].weight.to_local().shape),
        )
        for name, layer in (
            ("k_proj", attention.k_proj),
            ("gate_proj", mlp.gate_proj),
            ("down_proj", mlp.down_proj),
        )
    }
    out["all_dtensors"] = all(
        isinstance(p, DTensor) for n, p in peft_model.named_parameters() if "lora_" in n
    )
    splice.peft.save_adapter(peft_model, workdir / f"init-{tag}")
    clipping = splice_clip if clip == "splice" else None
    out["losses"] = train(peft_model, ids, opt, steps, clipping)
    out["logits"] = _logits(peft_model, ids)
    splice.peft.save_adapter(peft_model, workdir / f"trained-{tag}")
    out["merge_refused"] = ranks.error_of(lambda: peft_model.merge_adapter())
    peft_model.add_adapter("second", lora_config())  # not active: made, sharded, and frozen
    second = attention.k_proj.lora_B["second"].weight
    out["second"] = (type(second).__name__, repr(second.placements[0]), second.requires_grad)

    # the trained adapter, loaded onto a fresh tensor-parallel model, fused and not
    for name, config in (("fused", {"qkv": True, "gate_up": True}), ("unfused", {})):
        fresh = splice.from_pretrained(AutoModelForCausalLM, source, fusion_config=config, tp_plan="auto")
        if config:  # refused before the model is touched
            out["fuse_lora_refused"] = ranks.error_of(
                lambda fresh=fresh: splice.peft.load_adapter(
                    fresh, workdir / f"trained-{tag}", fuse_lora=True
                )
            )
        loaded = splice.peft.load_adapter(fresh, workdir / f"trained-{tag}")
        out[f"loaded_{name}_logits"] = _logits(loaded, ids)

    # a trainable load continues training like the one-process model does
    fresh = splice.from_pretrained(AutoModelForCausalLM, source, fusion_config=fusion, tp_plan="auto")
    resumed = splice.peft.load_adapter(fresh, workdir / f"init-{tag}", is_trainable=True)
    out["resumed_losses"] = train(resumed, ids, opt, steps, clipping)
    splice.peft.save_adapter(resumed, workdir / f"resumed-{tag}")

    if world == 4 and fusion:
        # a kv replica of B that trained apart, and padding of B that is no longer zero, stop the save
        k_b = attention.k_proj.lora_B["default"].weight.data.to_local()
        with torch.no_grad():
            kept = k_b.clone()
            if rank == 1:
                k_b += 1.0
            out["diverged"] = ranks.error_of(
                lambda: splice.peft.save_adapter(peft_model, workdir / "diverged")
            )
            k_b.copy_(kept)
            gate_b = mlp.gate_proj.lora_B["default"].weight.data.to_local()
            if rank == world - 1:
                gate_b[-1] = 1.0
            out["dirty_padding"] = ranks.error_of(
                lambda: splice.peft.save_adapter(peft_model, workdir / "dirty")
            )
        out["embedding_refused"] = ranks.error_of(
            lambda: splice.peft.get_peft_model(
                splice.from_pretrained(AutoModelForCausalLM, source, fusion_config=fusion, tp_plan="auto"),
                __import__("peft").LoraConfig(r=2, target_modules=["embed_tokens"]),
            )
        )
    return out


SCENARIOS = {"lora": lora}
