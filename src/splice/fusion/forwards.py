"""Fused forwards: an attention or MLP whose projections were fused runs them as one call.

`splice.fusion.linear` keeps a model's own forward working after fusing: ``self.q_proj(x)``,
``self.k_proj(x)`` and ``self.v_proj(x)`` share one GEMM through parameterless slices. That is
always correct, but the three calls, three splits and their bookkeeping remain, and at batch 1 on
a CPU that per-call cost is most of a decoding step. So, where splice *recognizes* a module's
forward, it swaps that one instance's ``forward`` (as the ``kernels`` library swaps forwards; no class
is touched) for one that calls ``qkv_proj`` once and splits once, or ``gate_up_proj`` once for
``act(gate) * up``.

Recognition is by proof, not by name: the source of the module class's ``forward``, with comments,
docstrings and annotations removed (its AST), must be one of the transformers forwards replicated here,
listed in :data:`ATTENTION` and :data:`MLP` by fingerprint. Identical source reading the same module
globals (``apply_rotary_pos_emb``, ``ALL_ATTENTION_FUNCTIONS``, ``eager_attention_forward``, which the
fused forward takes from the original's own globals) computes the same thing, so any class whose forward
matches runs fused, whatever its name, and any other (a transformers release that changed the forward,
a remote-code model) keeps its own forward and the slices. The fused forward also falls back, call by
call, to the class's forward whenever something sits on a projection: a LoRA layer or any other wrapper
in a slot, a hook on a slice or on the fused Linear, a global module hook. A fused forward never
skips what the original would have run.

`install` is called by the surgery after a module's children are fused, and `remove` when they are
put back, so ``unfuse`` restores the instance exactly (no ``forward`` in its ``__dict__``).
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import hashlib
import inspect
import textwrap
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from splice.fusion.linear import LinearSlice, _global_hooks


@dataclass(frozen=True)
class AttentionKind:
    """How one recognized attention forward differs from Llama's (the rest is line for line the same)."""

    sliding_window: str | None = None
    """Passed on as ``sliding_window=``: "config" (``getattr(config, "sliding_window", None)``), "attribute"."""
    softcap: bool = False
    """Passes ``softcap=self.attn_logit_softcapping`` (Gemma 2)."""
    qk_norm: str | None = None
    """"heads": q_norm/k_norm on ``[b, s, h, d]`` (Qwen3); "transposed": on ``[b, h, s, d]`` (Gemma 3)."""
    passes_position_ids: bool = False
    """Passes ``position_ids=position_ids``, even when None (Qwen2-VL's text attention)."""
    rotate_qk_together: bool = False
    """Set at install: no q/k norm and the module's rotary embedding is the known one, so q and k rotate as one."""


# fingerprints (see `fingerprint`) of transformers forwards, taken from transformers 5.23
ATTENTION: dict[str, AttentionKind] = {
    "865d17a1b6edd273": AttentionKind(),  # LlamaAttention, GemmaAttention (and Llava's text model)
    "38eb7a675fc00c3f": AttentionKind(sliding_window="config"),  # MistralAttention
    "467d2e0bba2fd378": AttentionKind(sliding_window="attribute"),  # Qwen2Attention
    "e0b15d778eecc3a8": AttentionKind(sliding_window="attribute", qk_norm="heads"),  # Qwen3Attention
    "c2f961b6c924f7c8": AttentionKind(sliding_window="attribute", softcap=True),  # Gemma2Attention
    "fd49946edd271563": AttentionKind(sliding_window="attribute", qk_norm="transposed"),  # Gemma3Attention
    # Qwen2VLAttention, Qwen2_5_VLAttention
    "d9335a51e0fe34c7": AttentionKind(sliding_window="attribute", passes_position_ids=True),
}
MLP: frozenset[str] = frozenset({"7d2027d4464e3e71"})  # down_proj(act_fn(gate_proj(x)) * up_proj(x))
ROPE = "f0e978aab1df6bb0"  # apply_rotary_pos_emb: q * cos + rotate_half(q) * sin, the same for k
ROTATE_HALF = "7b6c9b425ca04287"  # rotate_half: cat((-x2, x1), -1)

QKV = ("q_proj", "k_proj", "v_proj")
GATE_UP = ("gate_proj", "up_proj")


@functools.cache
def fingerprint(function: Callable[..., Any]) -> str | None:
    """A hash of the function's source AST without comments, docstrings and annotations; None if unreadable.

    A wrapped function (a decorator with ``__wrapped__``) has none: its behaviour is not its source's.
    """
    if not inspect.isfunction(function) or hasattr(function, "__wrapped__"):
        return None
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(function)))
    except (OSError, TypeError, SyntaxError):
        return None
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            node.returns = None
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
                node.body = body[1:] or [ast.Pass()]
        elif isinstance(node, ast.arg):
            node.annotation = None
    # unparsed source, not ast.dump: the dump gains fields across Python versions (type_params in 3.12)
    return hashlib.sha256(ast.unparse(tree).encode()).hexdigest()[:16]


def recognize(module: nn.Module) -> Callable[..., Any] | None:
    """The fused forward for ``module`` (not yet bound), or None when splice does not know its forward."""
    if "forward" in module.__dict__:  # already swapped, by splice or by someone else (accelerate hooks)
        return None
    original = type(module).forward
    mark = fingerprint(original)
    mods = module._modules
    if mark in ATTENTION and all(isinstance(mods.get(n), LinearSlice) for n in QKV):
        kind = ATTENTION[mark]
        together = kind.qk_norm is None and _plain_rope(original.__globals__)
        return functools.partial(
            attention_forward, dataclasses.replace(kind, rotate_qk_together=together), original
        )
    if mark in MLP and all(isinstance(mods.get(n), LinearSlice) for n in GATE_UP):
        return functools.partial(mlp_forward, original)
    return None


def install(module: nn.Module) -> Callable[..., Any] | None:
    """Swap the fused forward onto this instance if its forward is recognized; returns it (or None)."""
    forward = recognize(module)
    if forward is None:
        return None
    bound = functools.partial(forward, module)
    module.forward = bound
    return bound


def remove(module: nn.Module, bound: Callable[..., Any] | None) -> None:
    """Undo `install`: the instance's ``forward`` is its class's again."""
    if bound is not None and module.__dict__.get("forward") is bound:
        del module.__dict__["forward"]


def installed(module: nn.Module) -> bool:
    forward = module.__dict__.get("forward")
    return isinstance(forward, functools.partial) and forward.func in (attention_forward, mlp_forward)


# --------------------------------------------------------------------------------------------------
# the fused forwards


def plain_fused_linear(
    module: nn.Module, names: tuple[str, ...]
) -> tuple[Callable[[torch.Tensor], torch.Tensor], list[int]] | None:
    """What to call once for the slots ``names`` (a plain GEMM, or the fused module when something sits on
    it), and the part sizes.

    None when the slots would run anything else: a wrapper (LoRA) or a hook on a slot, a global hook,
    slots that are not this module's slices in order.
    """
    if _global_hooks():
        return None
    mods = module._modules
    shared = None
    for index, name in enumerate(names):
        part = mods.get(name)
        if (
            type(part) is not LinearSlice
            or part.index != index
            or part._forward_hooks
            or part._forward_pre_hooks
            or part._backward_hooks
            or part._backward_pre_hooks
        ):
            return None
        if shared is None:
            shared = part.shared
        elif part.shared is not shared:
            return None
    if shared is None or shared.parent is not module or len(shared.sizes) != len(names):
        return None
    fused = mods.get(shared.fused_name)
    if fused is None:
        return None
    sizes = [stop - start for start, stop in shared.bounds]
    plain = type(fused) is nn.Linear and not (
        fused._forward_hooks or fused._forward_pre_hooks or fused._backward_hooks or fused._backward_pre_hooks
    )
    if plain:
        weight, bias = fused.weight, fused.bias
        return (lambda x: F.linear(x, weight, bias)), sizes
    # a wrapper (LoRA on qkv_proj), a hook, tensor-parallel hooks or a Linear subclass on the fused
    # Linear: call the module itself, once, so each of them runs exactly as often as the GEMM does
    return fused, sizes


def mlp_forward(
    original: Callable[..., Any], self: nn.Module, x: torch.Tensor, *args: Any, **kwargs: Any
) -> Any:
    found = None if args or kwargs else plain_fused_linear(self, GATE_UP)
    if found is None:
        return original(self, x, *args, **kwargs)
    fused, sizes = found
    gate, up = fused(x).split(sizes, dim=-1)
    return self.down_proj(self.act_fn(gate) * up)


def attention_forward(
    kind: AttentionKind, original: Callable[..., Any], self: nn.Module, *args: Any, **kwargs: Any
) -> Any:
    found = plain_fused_linear(self, QKV)
    if found is None:
        return original(self, *args, **kwargs)
    arguments = _bind(original, self, args, kwargs)
    hidden_states = arguments.pop("hidden_states")
    position_embeddings = arguments.pop("position_embeddings")
    attention_mask = arguments.pop("attention_mask")
    past_key_values = arguments.pop("past_key_values")
    extra = arguments.pop("kwargs")
    if kind.passes_position_ids:
        arguments.setdefault("position_ids", extra.pop("position_ids", None))
    globals_ = original.__globals__
    fused, sizes = found
    input_shape = hidden_states.shape[:-1]
    hidden_shape = (*input_shape, -1, self.head_dim)
    qkv = fused(hidden_states)
    cos, sin = position_embeddings
    if kind.rotate_qk_together:
        # q and k get the same rotation per head: rotate them as one tensor, then split the heads
        q_rows, k_rows, _ = sizes
        qk = qkv[..., : q_rows + k_rows].view(hidden_shape).transpose(1, 2)
        value_states = qkv[..., q_rows + k_rows :].view(hidden_shape).transpose(1, 2)
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        qk = (qk * cos) + (globals_["rotate_half"](qk) * sin)
        query_states, key_states = qk.split((q_rows // self.head_dim, k_rows // self.head_dim), dim=1)
    else:
        query, key, value = qkv.split(sizes, dim=-1)
        query_states, key_states = query.view(hidden_shape), key.view(hidden_shape)
        if kind.qk_norm == "heads":
            query_states, key_states = self.q_norm(query_states), self.k_norm(key_states)
        query_states, key_states = query_states.transpose(1, 2), key_states.transpose(1, 2)
        value_states = value.view(hidden_shape).transpose(1, 2)
        if kind.qk_norm == "transposed":
            query_states, key_states = self.q_norm(query_states), self.k_norm(key_states)
        query_states, key_states = globals_["apply_rotary_pos_emb"](query_states, key_states, cos, sin)

    if past_key_values is not None:
        key_states, value_states = past_key_values.update(key_states, value_states, self.layer_idx)

    attention_interface = globals_["ALL_ATTENTION_FUNCTIONS"].get_interface(
        self.config._attn_implementation, globals_["eager_attention_forward"]
    )
    if kind.sliding_window == "config":
        arguments["sliding_window"] = getattr(self.config, "sliding_window", None)
    elif kind.sliding_window == "attribute":
        arguments["sliding_window"] = self.sliding_window
    if kind.softcap:
        arguments["softcap"] = self.attn_logit_softcapping
    attn_output, attn_weights = attention_interface(
        self,
        query_states,
        key_states,
        value_states,
        attention_mask,
        dropout=0.0 if not self.training else self.attention_dropout,
        scaling=self.scaling,
        **arguments,
        **extra,
    )
    attn_output = attn_output.reshape(*input_shape, -1).contiguous()
    return self.o_proj(attn_output), attn_weights


def _bind(original: Callable[..., Any], self: nn.Module, args: tuple, kwargs: dict) -> dict[str, Any]:
    """The original forward's arguments by name, defaults applied (its signature differs per family)."""
    if (
        not args
        and "hidden_states" in kwargs
        and "attention_mask" in kwargs
        and "position_embeddings" in kwargs
    ):
        # the decoder layers' call: everything by keyword; skip inspect's binding (~20 us per call)
        kwargs = dict(kwargs)
        out = {n: kwargs.pop(n, None) for n in ("hidden_states", "position_embeddings", "attention_mask")}
        out["past_key_values"] = kwargs.pop("past_key_values", None)
        out["kwargs"] = kwargs
        return out
    bound = _signature(original).bind(self, *args, **kwargs)
    bound.apply_defaults()
    out = dict(bound.arguments)
    out.pop("self")
    return out


@functools.cache
def _signature(function: Callable[..., Any]) -> inspect.Signature:
    return inspect.signature(function)


def _plain_rope(globals_: dict[str, Any]) -> bool:
    """The module's rotary embedding is the known one, so it may be applied to q and k as one tensor."""
    return (
        fingerprint(globals_.get("apply_rotary_pos_emb")) == ROPE
        and fingerprint(globals_.get("rotate_half")) == ROTATE_HALF
    )
