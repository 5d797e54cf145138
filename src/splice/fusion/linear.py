"""Sibling Linears that read the same input become one Linear: the mechanism behind `qkv` and `gate_up`.

The fused weight lives in a real ``nn.Linear`` registered on the parent (``qkv_proj``), so kernels,
tensor-parallel plans and PEFT see an ordinary Linear. Each original slot (``q_proj``, ``k_proj``,
``v_proj``) holds a :class:`LinearSlice`: a parameterless stand-in that multiplies by its rows of the
fused weight, read at call time. ``self.q_proj(x)``, ``self.k_proj(x)`` and ``self.v_proj(x)`` still
work, so no model's attention or MLP forward has to be copied; code that calls the fused Linear once
and splits its output (a fused forward, a kernel) gets one GEMM.

The slices share nothing between calls. An earlier version ran the fused GEMM on the first slice's
call and let its siblings read that output; it returned stale results whenever the input or the
weights changed between sibling calls in ways no version counter records (an inference tensor
modified in place, a write through ``.data``), and at batch-1 decoding it bought nothing measurable
(benchmarks/bench_shared_gemm.py): the three GEMMs read the same weight bytes as the one.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules import module as _module

from splice.fusion.contract import FusedLayout, LinearStandIn, Membership, WeightRows
from splice.fusion.spec import FusionOptions, ModuleFusionSpec
from splice.transforms import Concat, InsertZeros
from splice.weightmap import Rule


class SharedGEMM:
    """The fused Linear shared by one group of :class:`LinearSlice` modules, and each slice's rows of it."""

    def __init__(self, parent: nn.Module, fused_name: str, sizes: tuple[int, ...]):
        self.parent = (
            parent  # looked up by name at call time, so a wrapper put on the fused Linear is honoured
        )
        self.fused_name = fused_name
        self.sizes = tuple(sizes)
        starts = [sum(self.sizes[:i]) for i in range(len(self.sizes))]
        self.bounds = tuple((s, s + n) for s, n in zip(starts, self.sizes))

    @property
    def bounds(self) -> tuple[tuple[int, int], ...]:
        """Rows of each part in the fused output (per rank under tensor parallelism)."""
        return self._bounds

    @bounds.setter
    def bounds(self, bounds: tuple[tuple[int, int], ...]) -> None:
        bounds = tuple((int(a), int(b)) for a, b in bounds)
        if bounds[0][0] != 0 or any(a[1] != b[0] for a, b in zip(bounds, bounds[1:])):
            raise ValueError(f"fused part bounds must tile the output from 0: {bounds}")
        self._bounds = bounds

    def set_part(self, index: int, start: int, stop: int) -> None:
        """Move one part's rows; the parts are moved one by one, so this does not check they tile."""
        self._bounds = tuple((start, stop) if i == index else b for i, b in enumerate(self._bounds))

    @property
    def fused(self) -> nn.Module:
        return self.parent._modules[self.fused_name]

    def __call__(self, x: torch.Tensor, index: int) -> torch.Tensor:
        """Part ``index`` of the fused Linear's output for ``x``, computed now from the current weights."""
        module = self.parent._modules[self.fused_name]
        start, stop = self._bounds[index]
        if (
            type(module) is not nn.Linear
            or module._forward_hooks
            or module._forward_pre_hooks
            or _global_hooks()
        ):
            return module(x)[..., start:stop]  # a wrapper (LoRA on the fused Linear, TP hooks) must run
        weight, bias = module._parameters["weight"], module._parameters["bias"]
        return F.linear(x, weight[start:stop], None if bias is None else bias[start:stop])


def _global_hooks() -> bool:
    return bool(
        _module._global_forward_hooks
        or _module._global_forward_pre_hooks
        or _module._global_backward_hooks
        or _module._global_backward_pre_hooks
    )


class LinearSlice(LinearStandIn):
    """Stands where one of the fused Linears was, and returns its rows of the fused Linear's output."""

    def __init__(self, shared: SharedGEMM, index: int, in_features: int):
        super().__init__()
        self.__dict__["shared"] = shared  # not a submodule: the fused Linear belongs to the parent
        self.index = index
        self.in_features = in_features
        self.out_features = shared.sizes[index]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.shared(x, self.index)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        # Module.__call__ costs ~2 us per call in its hook bookkeeping; three slices per attention make it
        # a visible overhead at batch 1. Take the short path only when there is no hook to honour.
        if (
            len(args) == 1
            and not kwargs
            and not (
                self._forward_hooks
                or self._forward_pre_hooks
                or self._backward_hooks
                or self._backward_pre_hooks
                or _global_hooks()
            )
        ):
            return self.shared(args[0], self.index)
        return super().__call__(*args, **kwargs)

    @property
    def weight(self) -> torch.Tensor:
        start, stop = self.shared.bounds[self.index]
        return _local(base_layer(self.shared.fused).weight)[start:stop]

    @property
    def bias(self) -> torch.Tensor | None:
        bias = base_layer(self.shared.fused).bias
        start, stop = self.shared.bounds[self.index]
        return None if bias is None else _local(bias)[start:stop]

    def read_rows(self, start: int, stop: int) -> None:
        self.shared.set_part(self.index, start, stop)
        self.out_features = stop - start

    def describe(self) -> str:
        start, stop = self.shared.bounds[self.index]
        return f"a slice (rows {start}:{stop}) of the fused {self.shared.fused_name}"

    def weight_rows(self) -> list[WeightRows]:
        fused = base_layer(self.shared.fused)
        start, stop = self.shared.bounds[self.index]
        return [WeightRows(fused.weight, fused.bias, slice(start, stop), slice(0, stop - start))]

    def memberships(self, parent: nn.Module, children: Mapping[str, nn.Module]) -> dict[str, Membership]:
        if self.shared.parent is not parent:
            return {}
        group = sorted(
            (c.index, n)
            for n, c in children.items()
            if isinstance(c, LinearSlice) and c.shared is self.shared
        )
        sizes = self.shared.sizes
        if len(group) != len(sizes):
            return {}  # a slice was removed by hand; leave the group alone
        fused = self.shared.fused_name
        found = {fused: Membership("fused", members=tuple(n for _, n in group), sizes=sizes)}
        for index, name in group:
            found[name] = Membership("slice", group=fused, sizes=sizes, index=index)
        return found

    def extra_repr(self) -> str:
        start, stop = self.shared.bounds[self.index]
        return f"in_features={self.in_features}, out_features={self.out_features}, rows [{start}:{stop}] of {self.shared.fused_name}"


def _local(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's rows of a sharded (DTensor) parameter; bounds are local under tensor parallelism."""
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


# nn.Linear subclasses that override forward with Linear's own math (by qualified class name); any other
# subclass that overrides forward (a quantized Linear, say) computes something else and is not fused
LINEAR_EQUIVALENTS: frozenset[str] = frozenset(
    {
        # `input @ self.weight.T + self.bias`: F.linear with the bias added after the GEMM
        "transformers.models.falcon.modeling_falcon.FalconLinear",
    }
)


def linear_problem(module: nn.Module | None, name: str) -> str | None:
    """None when ``module`` computes ``x @ W.T + b`` like ``nn.Linear``, else why not (naming its class)."""
    if not isinstance(module, nn.Linear):
        return f"it has no nn.Linear child named {name}"
    cls = type(module)
    if cls.forward is nn.Linear.forward or f"{cls.__module__}.{cls.__qualname__}" in LINEAR_EQUIVALENTS:
        return None
    return (
        f"{name} is a {cls.__module__}.{cls.__qualname__}, an nn.Linear subclass with its own forward "
        "(not known to be nn.Linear's math)"
    )


def linear_class(module: nn.Linear) -> type[nn.Linear]:
    """The class a fused or split replacement of ``module`` gets: its own when it overrides forward with
    Linear's math in its own way (FalconLinear's rounding), else nn.Linear (whose math it uses)."""
    cls = type(module)
    return nn.Linear if cls.forward is nn.Linear.forward else cls


def base_layer(module: nn.Module) -> nn.Module:
    """The module holding the weight, through LoRA and similar wrappers (which keep it as ``base_layer``)."""
    while not hasattr(module, "weight") and hasattr(module, "base_layer"):
        module = module.base_layer
    return module


@dataclass(frozen=True)
class SiblingLinearsOptions(FusionOptions):
    names: tuple[str, ...] | None = None
    """The sibling Linears to fuse, in order (default: the family's known spellings)."""
    fused_name: str | None = None
    """Attribute name of the fused Linear (default: the family's convention)."""


class SiblingLinearsSpec(ModuleFusionSpec):
    """Fuse N sibling ``nn.Linear`` children that share ``in_features`` into one, concatenated along outputs."""

    options_class: ClassVar[type[FusionOptions]] = SiblingLinearsOptions
    candidate_names: ClassVar[tuple[tuple[str, ...], ...]] = ()
    fused_name: ClassVar[str] = ""

    def check_options(self, family: str, options: SiblingLinearsOptions) -> None:  # type: ignore[override]
        from splice.errors import FusionError

        if options.names is not None and len(options.names) < 2:
            raise FusionError(
                f"{family!r}: option names must list at least two attribute names, got {options.names!r}"
            )

    def names_for(self, module: nn.Module, options: SiblingLinearsOptions) -> tuple[str, ...] | None:
        candidates = (options.names,) if options.names else self.candidate_names
        for names in candidates:
            if self._names_problem(module, names, options) is None:
                return names
        return None

    def refusal(self, module: nn.Module, options: SiblingLinearsOptions) -> str | None:  # type: ignore[override]
        """The family claims every module that has children with all the names of one spelling and one input width."""
        if self.names_for(module, options) is not None or self._fused_name(options) in module._modules:
            return None  # fusable, or already fused (or shipped fused)
        candidates = (options.names,) if options.names else self.candidate_names
        for names in candidates:
            children = [module._modules.get(n) for n in names]
            if any(c is None for c in children):
                continue
            if all(isinstance(c, nn.Linear) for c in children) and len({c.in_features for c in children}) > 1:
                return None  # they read different inputs (cross-attention from another width): not a group
            return self._names_problem(module, names, options)
        return None

    def why_not(self, module: nn.Module, options: SiblingLinearsOptions) -> str | None:  # type: ignore[override]
        """Why the first spelling's children of ``module`` (when it has them all) cannot be fused."""
        names = options.names or self.candidate_names[0]
        if not all(n in module._modules for n in names):
            return None
        return self._names_problem(module, tuple(names), options)

    def _names_problem(
        self, module: nn.Module, names: tuple[str, ...], options: SiblingLinearsOptions
    ) -> str | None:
        """None when ``names`` can be fused in ``module``, else the reason."""
        children = [module._modules.get(n) for n in names]
        if not all(isinstance(c, nn.Linear) for c in children):
            odd = [(n, c) for n, c in zip(names, children) if c is not None and not isinstance(c, nn.Linear)]
            if odd and len(odd) < len(names):
                return f"{odd[0][0]} is a {type(odd[0][1]).__name__}, not an nn.Linear"
            return f"it has no nn.Linear children named {', '.join(names)}"
        first = children[0]
        for name, child in zip(names, children):
            problem = linear_problem(child, name)
            if problem is not None:
                return problem
            if linear_class(child) is not linear_class(first):
                return f"{name} is a {type(child).__name__} but {names[0]} is a {type(first).__name__}"
            if child.in_features != first.in_features:
                return f"{name} reads {child.in_features} features but {names[0]} reads {first.in_features}"
            if child.weight.dtype != first.weight.dtype or child.weight.device != first.weight.device:
                return f"{name} is {child.weight.dtype} on {child.weight.device}, {names[0]} is {first.weight.dtype} on {first.weight.device}"
        if self._fused_name(options) in module._modules:
            return f"it already has a child named {self._fused_name(options)}"
        return None

    def _fused_name(self, options: SiblingLinearsOptions) -> str:
        return options.fused_name or self.fused_name

    def is_fusable(self, module: nn.Module, options: SiblingLinearsOptions) -> bool:  # type: ignore[override]
        return self.names_for(module, options) is not None

    def describe_candidates(self, options: SiblingLinearsOptions) -> str:  # type: ignore[override]
        spellings = (options.names,) if options.names else self.candidate_names
        return "modules with nn.Linear children named " + " or ".join("/".join(n) for n in spellings)

    def make_fused_module(self, module: nn.Module, options: SiblingLinearsOptions) -> dict[str, nn.Module]:  # type: ignore[override]
        names = self.names_for(module, options)
        assert names is not None
        linears = [module._modules[n] for n in names]
        sizes = tuple(lin.out_features for lin in linears)
        fused_name = self._fused_name(options)
        first = linears[0]
        fused = linear_class(first)(  # FalconLinear stays FalconLinear (its rounding), others nn.Linear
            first.in_features,
            sum(sizes),
            bias=any(lin.bias is not None for lin in linears),  # a Linear without one gets a zero block
            device="meta",
            dtype=first.weight.dtype,
        )
        shared = SharedGEMM(module, fused_name, sizes)
        slices = {n: LinearSlice(shared, i, first.in_features) for i, n in enumerate(names)}
        return {fused_name: fused, **slices}

    def make_transforms(self, module: nn.Module, options: SiblingLinearsOptions) -> list[Rule]:  # type: ignore[override]
        names = self.names_for(module, options)
        assert names is not None
        linears = [module._modules[n] for n in names]
        concat = Concat(0, tuple(lin.out_features for lin in linears))
        fused_name = self._fused_name(options)
        rules = [Rule(tuple(f"{n}.weight" for n in names), (f"{fused_name}.weight",), (concat,))]
        with_bias = [n for n, lin in zip(names, linears) if lin.bias is not None]
        if with_bias:  # Whisper's k_proj has none: its rows of the fused bias are an exact zero block
            missing = [i for i, lin in enumerate(linears) if lin.bias is None]
            zeros = InsertZeros(0, tuple(missing), tuple(linears[i].out_features for i in missing))
            ops = ((zeros,) if missing else ()) + (concat,)
            rules.append(Rule(tuple(f"{n}.bias" for n in with_bias), (f"{fused_name}.bias",), ops))
        return rules

    def layout(self, module: nn.Module, options: SiblingLinearsOptions) -> FusedLayout:  # type: ignore[override]
        names = self.names_for(module, options)
        assert names is not None
        sizes = tuple(module._modules[n].out_features for n in names)
        return FusedLayout(self._fused_name(options), tuple(names), sizes)
