"""Plugging an optimized forward into a fused module, with the pure-torch fallback as the default.

A fused chain (`splice.fuse_modules`, or the `norm_mlp` family) runs its members one after the other
unless a kernel is plugged in. A kernel is any callable ``kernel(chain, *args, **kwargs)`` that
receives the chain module and the first member's inputs and returns the last member's output::

    def my_norm_mlp(chain, x):
        norm, mlp = (getattr(chain, n) for n in chain.names)
        return mlp(norm(x))          # replace with a fused implementation

    splice.kernels.register_kernel("my_norm_mlp", my_norm_mlp)
    splice.kernels.use_kernel(model, "my_norm_mlp")   # or use_kernel(model, my_norm_mlp)
    splice.kernels.use_kernel(model, None)            # back to the fallback

Kernels are set per module instance; nothing global changes when one is used.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from splice.errors import FusionError
from splice.fusion import chain as chain_fusion
from splice.fusion.chain import FusedChain
from splice.fusion.forwards import fingerprint
from splice.fusion.linear import LinearSlice
from splice.fusion.state import FusionReport

Kernel = Callable[..., Any]


@dataclass(frozen=True)
class KernelSpec:
    name: str
    fn: Kernel
    matches: Callable[[FusedChain], bool]
    doc: str = ""
    takes_last_arguments: bool = False  # see FusedChain.set_kernel
    calls_modules: bool = False  # see FusedChain.set_kernel


_KERNELS: dict[str, KernelSpec] = {}


def register_kernel(
    name: str,
    fn: Kernel,
    *,
    matches: Callable[[FusedChain], bool] | None = None,
    replace: bool = False,
    takes_last_arguments: bool = False,
    calls_modules: bool = False,
) -> None:
    """Make ``fn`` usable by name; ``matches(chain)`` says which fused chains it can run.

    ``takes_last_arguments``: ``fn(chain, x, *args, **kwargs)`` also receives the last member's arguments
    besides its input (see `FusedChain.set_kernel`); otherwise such calls run the chain in order.
    """
    if name in _KERNELS and not replace:
        raise FusionError(f"kernel {name!r} is already registered; pass replace=True to override it")
    doc = (fn.__doc__ or "").strip()
    _KERNELS[name] = KernelSpec(
        name, fn, matches or (lambda chain: True), doc, takes_last_arguments, calls_modules
    )


def fuse_modules(
    model: nn.Module, globs: Sequence[str], *, kernel: str | Kernel | None = None
) -> FusionReport:
    """`splice.fusion.fuse_modules`, then ``kernel`` (a registered name or a callable) plugged into every new chain.

    ``splice.fuse_modules(model, ["model.layers.*.post_attention_layernorm", "model.layers.*.mlp"],
    kernel="rms_norm_gated_mlp")``; returns the FusionReport.
    """
    report = chain_fusion.fuse_modules(model, globs)
    if kernel is not None:
        # the chains themselves, not their parents: a parent may hold other chains (norm + MLP beside norm + attention)
        paths = [
            f"{r.path}.{name}" if r.path else name
            for r in report.records
            for name, module in r.installed.items()
            if isinstance(module, FusedChain)
        ]
        use_kernel(model, kernel, modules=paths)
    return report


def use_kernel(
    model: nn.Module, kernel: str | Kernel | None, *, modules: str | Sequence[str] | None = None
) -> int:
    """Plug ``kernel`` into the fused chains of ``model`` (all, those matching a regex, or at given paths).

    ``kernel`` is a registered name, ``"auto"`` (the first registered kernel that matches each chain),
    a callable, or None to go back to the pure-torch fallback. Returns the number of chains changed.
    """
    chains = [(p, m) for p, m in model.named_modules() if isinstance(m, FusedChain)]
    if isinstance(modules, str):
        chains = [(p, m) for p, m in chains if re.search(modules, p)]
    elif modules is not None:
        wanted = {f"{p}.{n}" if p else n for p in modules for n in ("",)} | set(modules)
        chains = [(p, m) for p, m in chains if p.rpartition(".")[0] in wanted or p in wanted]
    if not chains:
        raise FusionError(
            f"use_kernel: no fused chain found{'' if modules is None else f' at {modules!r}'}; fuse first"
        )
    changed = 0
    for path, chain in chains:
        if kernel is None:
            chain.set_kernel(None)
        elif callable(kernel):
            chain.set_kernel(kernel, getattr(kernel, "__name__", "custom"))
        elif kernel == "auto":
            spec = next((s for s in _KERNELS.values() if s.matches(chain)), None)
            if spec is None:
                continue
            _plug(chain, spec)
        else:
            spec = _KERNELS.get(kernel)
            if spec is None:
                raise FusionError(f"unknown kernel {kernel!r}; registered kernels: {sorted(_KERNELS)}")
            if not spec.matches(chain):
                raise FusionError(
                    f"kernel {kernel!r} cannot run the fused chain at {path} ({'+'.join(chain.names)})"
                )
            _plug(chain, spec)
        changed += 1
    return changed


def _plug(chain: FusedChain, spec: KernelSpec) -> None:
    chain.set_kernel(
        spec.fn, spec.name, takes_last_arguments=spec.takes_last_arguments, calls_modules=spec.calls_modules
    )


# --------------------------------------------------------------------------------------------------
# weight layout for batch-1 decoding


def use_column_major(model: nn.Module, modules: str | None = None, *, enabled: bool = True) -> int:
    """Store Linear weights column-major (``[out, in]`` with strides ``(1, out)``): batch-1 decoding reads them faster.

    On a CPU, one decoding step is a matrix-vector product per projection, and MKL's runs at ~10 GB/s
    on a row-major ``[out, in]`` weight against ~21 GB/s on the same values stored column-major, when
    ``out >= in`` (timed per shape with ``F.linear`` on the 2-core machine the benchmarks run on; a
    ``[512, 1376]`` down projection is faster row-major, and at 8 rows or more the two layouts are
    within ~10% either way; ``benchmarks/bench_decode.py`` shows the effect on whole decoding steps). A fused
    projection is that shape: ``qkv_proj`` and ``gate_up_proj`` are wider than their input, which is
    where fusion and this layout pay together.

    Only the strides change: the parameter objects, shapes and values stay (bitwise), so state dicts,
    saves, optimizers and LoRA see the same weights; products differ from row-major ones by rounding
    (a different summation order). ``modules=None`` picks the fused projections (the Linears that
    splice's slices share) with ``out_features >= in_features``; a regex picks any ``nn.Linear`` whose
    path matches. ``enabled=False`` makes the chosen weights contiguous again. Returns how many weights
    changed layout. Call it on a built model, before ``torch.compile``; sharded (DTensor) weights are
    refused.
    """
    if modules is None:
        chosen = {
            id(fused): (path, fused)
            for path, fused in _fused_projections(model)
            if fused.out_features >= fused.in_features
        }
        if not chosen:
            raise FusionError(
                "use_column_major: the model has no fused projection (qkv_proj, gate_up_proj) at least as "
                "wide as its input; fuse first, or pass modules=<regex> to choose Linears"
            )
    else:
        pattern = re.compile(modules)
        chosen = {
            id(m): (p, m) for p, m in model.named_modules() if isinstance(m, nn.Linear) and pattern.search(p)
        }
        if not chosen:
            linears = [p for p, m in model.named_modules() if isinstance(m, nn.Linear)]
            raise FusionError(
                f"use_column_major: modules={modules!r} matched no nn.Linear; Linears include {linears[:5]}"
            )
    for path, linear in chosen.values():
        weight = linear.weight
        if weight.ndim != 2 or type(weight.data) is not torch.Tensor:
            raise FusionError(
                f"use_column_major: {path}.weight is a {type(weight.data).__name__} of {weight.ndim} dims; "
                "only plain 2-D weights of a model in one process can change layout"
            )
    changed = 0
    with torch.no_grad():
        for _, linear in chosen.values():
            weight = linear.weight
            column_major = weight.stride() == (1, weight.shape[0])
            if enabled and not column_major:
                weight.data = weight.data.t().contiguous().t()
                changed += 1
            elif not enabled and not weight.is_contiguous():
                weight.data = weight.data.contiguous()
                changed += 1
    return changed


def _fused_projections(model: nn.Module) -> list[tuple[str, nn.Linear]]:
    """The fused Linears that splice's slices share, with their paths."""
    paths = {id(m): p for p, m in model.named_modules()}
    found: dict[int, tuple[str, nn.Linear]] = {}
    for module in model.modules():
        if isinstance(module, LinearSlice):
            fused = module.shared.fused
            if type(fused) is nn.Linear and id(fused) in paths:
                found[id(fused)] = (paths[id(fused)], fused)
    return list(found.values())


# --------------------------------------------------------------------------------------------------
# built-in kernels


RMS_NORM = (
    "9635bcd843f309a0"  # LlamaRMSNorm.forward (Mistral, Qwen2, Qwen3 share it), by forwards.fingerprint
)


def _rms_norm_like(module: nn.Module) -> bool:
    # Llama's RMSNorm, proven by its forward's source: weight * normalize(x.float()).to(dtype). Gemma's
    # (1 + weight) variant, or a norm that merely has the name, runs its own forward.
    return (
        fingerprint(type(module).forward) == RMS_NORM
        and isinstance(getattr(module, "weight", None), torch.Tensor)
        and isinstance(getattr(module, "variance_epsilon", None), float)
    )


def _gated_mlp(module: nn.Module) -> bool:
    return all(hasattr(module, a) for a in ("down_proj", "act_fn")) and (
        hasattr(module, "gate_up_proj") or all(hasattr(module, a) for a in ("gate_proj", "up_proj"))
    )


def _matches_rms_norm_mlp(chain: FusedChain) -> bool:
    if len(chain.names) != 2:
        return False
    norm, mlp = (getattr(chain, n) for n in chain.names)
    return _rms_norm_like(norm) and _gated_mlp(mlp)


def _matches_rms_norm_attention(chain: FusedChain) -> bool:
    if len(chain.names) != 2:
        return False
    norm, attention = (getattr(chain, n) for n in chain.names)
    return _rms_norm_like(norm) and any(hasattr(attention, n) for n in ("qkv_proj", "q_proj"))


def _direct(module: nn.Module | None, cls: type) -> bool:
    """Calling ``module`` would run only ``cls.forward``: no wrapper (a LoRA layer) and no hooks on it."""
    return type(module) is cls and not (module._forward_hooks or module._forward_pre_hooks)


def rms_norm(norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Llama's RMSNorm as one op where that is the same computation: fp32 input and weight.

    Transformers computes ``weight * (x.float() * rsqrt(mean(x.float()**2) + eps)).to(dtype)``: 8 ops, and
    for a half-precision input the product with the weight is rounded differently than in
    ``torch.rms_norm``, so other dtypes take the written-out formula.
    """
    weight = norm.weight
    if x.dtype == torch.float32 and weight.dtype == torch.float32:
        return torch.rms_norm(x, weight.shape, weight, norm.variance_epsilon)
    dtype = x.dtype
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon)
    return weight * h.to(dtype)


def rms_norm_attention(chain: FusedChain, x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
    """RMSNorm then an attention: the norm as one op, then the attention (its fused forward: one qkv GEMM)."""
    norm, attention = (getattr(chain, n) for n in chain.names)
    if not _direct(norm, type(norm)):
        h = norm(x)
    else:
        h = rms_norm(norm, x)
    return attention(h, *args, **kwargs) if args else attention(hidden_states=h, **kwargs)


def rms_norm_gated_mlp(chain: FusedChain, x: torch.Tensor) -> torch.Tensor:
    """RMSNorm then a gated MLP, as few kernel launches as plain torch allows (one GEMM for gate+up).

    Weights are read directly only where that is what the modules would compute: a norm or an MLP with
    hooks runs the chain in order, and a LoRA layer (or a hook) on gate_up_proj, gate_proj or up_proj is
    called.
    """
    norm, mlp = (getattr(chain, n) for n in chain.names)
    if not _direct(norm, type(norm)) or not _direct(mlp, type(mlp)):
        return _run_in_order(chain, x)
    h = rms_norm(norm, x)
    fused = getattr(mlp, "gate_up_proj", None)
    parts = [getattr(mlp, n, None) for n in ("gate_proj", "up_proj")]
    if _direct(fused, nn.Linear) and all(p is None or _direct(p, LinearSlice) for p in parts):
        gate, up = F.linear(h, fused.weight, fused.bias).chunk(2, dim=-1)
    elif None in parts:  # a model that ships gate_up_proj, wrapped
        gate, up = fused(h).chunk(2, dim=-1)
    else:  # the slices run the one shared GEMM, through whatever wraps it
        gate, up = mlp.gate_proj(h), mlp.up_proj(h)
    return mlp.down_proj(mlp.act_fn(gate) * up)


def _run_in_order(chain: FusedChain, *args: Any, **kwargs: Any) -> Any:
    out = args
    for i, name in enumerate(chain.names):
        out = getattr(chain, name)(*(out if i == 0 else (out,)), **(kwargs if i == 0 else {}))
    return out


_compiled_run: Callable[..., Any] | None = None


def compiled(chain: FusedChain, *args: Any, **kwargs: Any) -> Any:
    """The chain run in order under torch.compile (inductor).

    One compiled function serves every chain: dynamo lifts the chain's parameters to graph inputs, so
    the 24 norm+MLP chains of a 24-layer model share one graph instead of compiling (and guarding on)
    one closure each, which would also run into dynamo's per-function cache limit. Each compiled call
    still costs guard checks and a runtime wrapper (~0.1 ms on CPU), which batch-1 decoding feels;
    compiling the whole model amortizes that (see benchmarks/bench_decode.py).
    """
    global _compiled_run
    if _compiled_run is None:
        _compiled_run = torch.compile(_run_in_order, dynamic=True)
    return _compiled_run(chain, *args, **kwargs)


register_kernel("rms_norm_gated_mlp", rms_norm_gated_mlp, matches=_matches_rms_norm_mlp)
register_kernel(
    "rms_norm_attention", rms_norm_attention, matches=_matches_rms_norm_attention, takes_last_arguments=True
)
register_kernel(
    "compiled", compiled, calls_modules=True
)  # last: it matches every chain, and "auto" takes the first match
