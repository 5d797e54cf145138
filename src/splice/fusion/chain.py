"""Chain fusion: adjacent sibling modules become one module that owns all their weights.

``fuse_modules(model, ["model.layers.*.post_attention_layernorm", "model.layers.*.mlp"])`` puts a
:class:`FusedChain` where the *last* module of each chain stood; it owns every module of the chain
(``mlp.post_attention_layernorm``, ``mlp.mlp``). The earlier slots hold :class:`PassThrough` modules
that record their call and hand their input on unchanged, so the parent's forward still reads as
written, and the fused module runs the whole chain: through a plugged-in kernel
(`splice.kernels`) when there is one, else module by module.

The chain must really be adjacent: each pass-through hands on a new alias of its input (a view, no
copy), and each later member checks that it receives exactly that alias. Anything else is refused with
a FusionError before the chain runs: a changed tensor (something happened in between, which a fused
kernel would skip) or the earlier member's own input (the two are parallel branches, like
``gate_proj`` and ``up_proj``, not a chain).
"""

from __future__ import annotations

import difflib
import re
import threading
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import torch
from torch import nn

from splice.errors import FusionError
from splice.fusion.contract import StandIn
from splice.fusion.discovery import require_module
from splice.fusion.spec import FusionOptions, ModuleFusionSpec
from splice.fusion.surgery import fuse, unfuse
from splice.weightmap import Pattern, Rule


class ChainCalls:
    """The calls recorded by one chain's pass-throughs, per thread."""

    def __init__(self) -> None:
        self._local = threading.local()

    def record(self, index: int, args: tuple, kwargs: dict) -> Any:
        """Record a pass-through's call and return what it hands on: a new alias of its input.

        The alias, not the input itself, is what lets the next member tell "I got its output" from
        "I got the same input" (a parallel branch), which the identity of one tensor cannot.
        """
        calls = getattr(self._local, "calls", None)
        if calls is None or index == 0:
            calls = self._local.calls = []
        first = args[0]
        handed = first.view_as(first) if isinstance(first, torch.Tensor) else first
        calls.append((index, args, kwargs, handed))
        return handed

    def take(self) -> list[tuple[int, tuple, dict, Any]]:
        calls = getattr(self._local, "calls", None) or []
        self._local.calls = None
        return calls

    def __deepcopy__(self, memo: dict[int, Any]) -> ChainCalls:
        return ChainCalls()

    def __getstate__(self) -> dict[str, Any]:
        return {}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self._local = threading.local()


class PassThrough(StandIn):
    """Stands where an earlier module of a fused chain was: records the call, hands on its first input (an alias)."""

    forwards_only: ClassVar[bool] = True

    def __init__(self, calls: ChainCalls, index: int, original: str):
        super().__init__()
        self.__dict__["calls"] = calls
        self.index = index
        self.original = original

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if not args:
            raise FusionError(f"{self.original} (fused into a chain) was called without a positional input")
        return self.calls.record(self.index, args, kwargs)

    def extra_repr(self) -> str:
        return f"{self.original}: runs inside the fused chain"


Kernel = Callable[..., Any]


class FusedChain(StandIn):
    """Owns the modules of a chain and runs them as one: ``kernel(self, *args, **kwargs)`` or in order."""

    def __init__(self, names: Sequence[str], modules: Sequence[nn.Module], calls: ChainCalls):
        super().__init__()
        for name, module in zip(names, modules):
            self.add_module(name, module)
        self.names = tuple(names)
        self.__dict__["calls"] = calls
        self.__dict__["kernel"] = None
        self.__dict__["kernel_name"] = None
        self.__dict__["kernel_takes_last_arguments"] = False
        self.__dict__["kernel_calls_modules"] = True  # no kernel: the members run as they are

    def set_kernel(
        self,
        kernel: Kernel | None,
        name: str | None = None,
        *,
        takes_last_arguments: bool = False,
        calls_modules: bool = False,
    ) -> None:
        """Plug ``kernel`` in; ``takes_last_arguments``: it also runs chains whose last member gets more than its input.

        Such a kernel is called ``kernel(chain, x, *args, **kwargs)``: the chain's input, then the last member's
        other arguments (a norm + attention chain: the attention's position embeddings, mask, cache, ...).
        ``calls_modules``: the kernel calls the member modules (so wrappers on them, a LoRA layer say, still
        run) rather than reading their weights; PEFT refuses adapters inside chains whose kernel does not.
        """
        self.__dict__["kernel"] = kernel
        self.__dict__["kernel_name"] = name if kernel is not None else None
        self.__dict__["kernel_takes_last_arguments"] = takes_last_arguments and kernel is not None
        self.__dict__["kernel_calls_modules"] = calls_modules or kernel is None

    @property
    def honours_wrappers(self) -> bool:
        """Whether a wrapper (a LoRA layer) put on a member runs: no kernel, or one that calls the members."""
        return self.kernel_calls_modules

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        calls = self.calls.take()
        expected = len(self.names) - 1
        if [c[0] for c in calls] != list(range(expected)):
            raise FusionError(
                f"fused chain {'+'.join(self.names)}: expected {', '.join(self.names[:-1])} to be called just before "
                f"{self.names[-1]}, got calls {[self.names[c[0]] for c in calls]}"
            )
        # each later member must receive exactly what the pass-through before it handed on; the last
        # may take it by keyword (an attention is called as self_attn(hidden_states=..., ...))
        name, rest_args, rest_kwargs = None, args[1:], kwargs
        if expected and not args:
            name = next((k for k, v in kwargs.items() if v is calls[-1][3]), None)
            rest_kwargs = {k: v for k, v in kwargs.items() if k != name}
        last_input = args[0] if args else kwargs.get(name) if name is not None else None
        received = [c[1][0] for c in calls[1:]] + [last_input]
        for (index, earlier_args, _, handed), given in zip(calls, received):
            if given is not handed:
                self._refuse_non_adjacent(index, same_input=given is earlier_args[0])
        first_args, first_kwargs = (calls[0][1], calls[0][2]) if calls else (args, kwargs)
        kernel = self.kernel
        if kernel is not None and all(len(c[1]) == 1 and not c[2] for c in calls[1:]):
            if not expected or not (rest_args or rest_kwargs):
                return kernel(self, *first_args, **first_kwargs)
            if self.kernel_takes_last_arguments and len(first_args) == 1 and not first_kwargs:
                return kernel(self, first_args[0], *rest_args, **rest_kwargs)
        modules = [getattr(self, n) for n in self.names]
        out = modules[0](*first_args, **first_kwargs)
        for (_, call_args, call_kwargs, _), module in zip(calls[1:], modules[1:-1]):
            out = module(out, *call_args[1:], **call_kwargs)
        if expected:
            if name is None:
                out = modules[-1](out, *rest_args, **rest_kwargs)
            else:
                out = modules[-1](*rest_args, **{name: out}, **rest_kwargs)
        return out

    def members(self) -> tuple[str, ...]:
        return self.names

    def describe(self) -> str:
        return f"the fused chain {'+'.join(self.names)}"

    def _refuse_non_adjacent(self, index: int, *, same_input: bool) -> None:
        earlier, later = self.names[index], self.names[index + 1]
        why = (
            f"got the same input as {earlier} (they are parallel branches, not a chain)"
            if same_input
            else f"did not receive the output of {earlier} unchanged"
        )
        raise FusionError(
            f"fused chain {'+'.join(self.names)}: {later} {why}, so these modules are not adjacent and cannot be fused"
        )

    def extra_repr(self) -> str:
        return f"kernel={self.kernel_name or 'none (modules run in order)'}"


def chain_children(parent: nn.Module, names: Sequence[str]) -> dict[str, nn.Module]:
    """The children to set on ``parent`` to fuse its children ``names`` (in call order)."""
    calls = ChainCalls()
    modules = [parent._modules[n] for n in names]
    children: dict[str, nn.Module] = {n: PassThrough(calls, i, n) for i, n in enumerate(names[:-1])}
    children[names[-1]] = FusedChain(names, modules, calls)
    return children


def chain_rules(names: Sequence[str]) -> list[Rule]:
    """Every tensor of every member moves under the fused module, keeping its own name."""
    last = names[-1]
    return [Rule((f"{n}.**",), (f"{last}.{n}.**",)) for n in names]


# --------------------------------------------------------------------------------------------------
# fuse_modules: chains chosen by globs


class ChainSpec(ModuleFusionSpec):
    """Fuse the children ``names`` of each module at ``parents``; one instance per `fuse_modules` call."""

    name: ClassVar[str] = "chain"
    requires_tensors: ClassVar[bool] = False

    def __init__(self, parents: Sequence[str], names: Sequence[str]):
        self.target_modules_patterns = tuple(parents)
        self.names = tuple(names)

    def is_fusable(self, module: nn.Module, options: FusionOptions) -> bool:
        return all(
            type(module._modules.get(n)) not in (PassThrough, FusedChain, type(None)) for n in self.names
        )

    def make_fused_module(self, module: nn.Module, options: FusionOptions) -> dict[str, nn.Module]:
        return chain_children(module, self.names)

    def make_transforms(self, module: nn.Module, options: FusionOptions) -> list[Rule]:
        return chain_rules(self.names)

    def describe_candidates(self, options: FusionOptions) -> str:
        return f"modules with unfused children {', '.join(self.names)}"

    def options_to_json(self, options: FusionOptions) -> Any:
        return {"names": list(self.names), "parents": list(self.target_modules_patterns)}


def plan_chains(model: nn.Module, globs: Sequence[str]) -> tuple[list[str], tuple[str, ...]]:
    """Parent paths and member names of the chains the globs select, or a FusionError saying why not."""
    if len(globs) < 2:
        raise FusionError(f"fuse_modules needs at least two module globs, got {list(globs)}")
    paths = [p for p, _ in model.named_modules() if p]
    matches: list[dict[tuple[str, ...], str]] = []
    for glob in globs:
        pattern = Pattern(glob)
        found = {}
        for path in paths:
            m = pattern.match(path)
            if m is not None:
                found[m[0]] = path
        if not found:
            general = list(dict.fromkeys(re.sub(r"(?<=\.)\d+(?=\.|$)", "*", p) for p in paths))
            close = difflib.get_close_matches(glob, general, n=3, cutoff=0.5)
            raise FusionError(
                f"fuse_modules: pattern {glob!r} matched no module; close module paths: {close or general[:3]}"
            )
        matches.append(found)
    parents: list[str] = []
    names: tuple[str, ...] | None = None
    for captures, first in matches[0].items():
        members = []
        for glob, found in zip(globs, matches):
            if captures not in found:
                raise FusionError(
                    f"fuse_modules: {first} has no partner for {glob!r} (expected {Pattern(glob).fill(captures)})"
                )
            members.append(found[captures])
        parent = {m.rpartition(".")[0] for m in members}
        if len(parent) != 1:
            raise FusionError(
                f"fuse_modules: chain members must be siblings; {', '.join(members)} have different parents"
            )
        chain_names = tuple(m.rpartition(".")[2] for m in members)
        if names is not None and chain_names != names:
            raise FusionError(f"fuse_modules: chains differ in member names: {names} and {chain_names}")
        if len(set(chain_names)) != len(chain_names):
            raise FusionError(f"fuse_modules: a chain lists one module twice: {members}")
        names = chain_names
        parents.append(parent.pop())
    assert names is not None
    return parents, names


def fuse_modules(model: nn.Module, globs: Sequence[str]):
    """Fuse each chain of adjacent sibling modules selected by ``globs`` into one module.

    ``fuse_modules(model, ["model.layers.*.post_attention_layernorm", "model.layers.*.mlp"])``
    returns a FusionReport. ``splice.fuse_modules`` (`splice.kernels.fuse_modules`) also plugs a kernel in.
    """
    require_module(model, "splice.fuse_modules")
    parents, names = plan_chains(model, globs)
    return fuse(model, {"chain": ChainSpec(parents, names)})


def unfuse_modules(model: nn.Module) -> int:
    """Undo every `fuse_modules` chain. Returns how many chains were restored."""
    return unfuse(model, family="chain")


__all__ = ["FusedChain", "PassThrough", "fuse_modules", "unfuse_modules", "chain_children", "chain_rules"]
