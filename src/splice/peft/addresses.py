"""Where each module of a fused or split model stands: in the runtime tree, and in the original one.

Fusing keeps most paths. The q_proj of a ``qkv``-fused attention is still at ``...self_attn.q_proj``
(a `LinearSlice`); the ``qkv`` of a split SAM attention is still at ``...attn.qkv`` (a
`ConcatLinears`). Chain fusion moves modules: ``layers.0.mlp`` becomes ``layers.0.mlp.mlp``. And
fusing and splitting add Linears the original model lacks: ``qkv_proj`` of a fused Llama, ``q`` of
a split SAM.

An :class:`AddressBook` lists every module with both paths and its kind, so that LoRA targets,
ranks and adapter keys can move between the two trees:

=========  ===============================================================  ==================
kind       what it is                                                       in the original?
=========  ===============================================================  ==================
module     a module splice did not replace (maybe moved by chain fusion)    yes
slice      a `LinearStandIn` (`LinearSlice`): an original Linear, rows of   yes
           a fused Linear
concat     a `LinearStandIn` (`ConcatLinears`): an original fused Linear,   yes
           split into parts
fused      the fused Linear of some slices (``qkv_proj`` of a fused Llama)  no: rows of slices
part       one Linear of a split (``q`` of a split SAM)                     no: rows of a concat
=========  ===============================================================  ==================
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass

from torch import nn

from splice.fusion.contract import LinearStandIn, Membership, StandIn
from splice.peft.errors import AdapterError


@dataclass(frozen=True, eq=False)
class Address:
    """One module: its runtime path, its path in the original model's namespace, and its kind."""

    runtime: str
    name: str  # for fused/part modules: where the module would stand in the original tree
    kind: str  # module | slice | concat | fused | part
    module: nn.Module  # the module itself, unwrapped from any PEFT layer around it
    linear: bool  # a Linear of the *original* model (what "all-linear" means)
    group: str | None = None  # slice/part: name of the whole (fused/concat) whose rows it holds
    members: tuple[str, ...] = ()  # fused/concat: names of the row blocks, in order
    sizes: tuple[int, ...] = ()  # row sizes of the group's blocks (fused/concat/slice/part)
    index: int = -1  # slice/part: which block
    groups: int = 1  # concat/part: the whole's rows are its blocks interleaved in this many groups (per head)

    @property
    def derived(self) -> bool:
        """True for modules the original model does not have."""
        return self.kind in ("fused", "part")

    def describe(self) -> str:
        """What the module is in the fused or split model, for error messages."""
        if self.kind in ("fused", "part"):
            return f"the {'fused' if self.kind == 'fused' else 'split'} Linear {self.runtime}"
        return describe(self.module)

    @property
    def rows(self) -> tuple[int, int]:
        """slice/part: the rows of the whole that this module holds (with its blocks back to back, see groups)."""
        start = sum(self.sizes[: self.index])
        return start, start + self.sizes[self.index]


def describe(module: nn.Module) -> str:
    """What a stand-in is, for error messages: ``a slice (rows 0:64) of the fused qkv_proj``."""
    return module.describe() if isinstance(module, StandIn) else type(module).__name__


class AddressBook:
    """Every module of one (fused, split, chain-fused, maybe PEFT-wrapped) model, by both paths."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.by_runtime: dict[str, Address] = {}
        self.by_name: dict[str, Address] = {}
        self.runtime_paths: list[str] = []  # every path PEFT matches targets against, stand-ins included
        self._walk(model, "", [])

    @classmethod
    def of(cls, model: nn.Module) -> AddressBook:
        return cls(base_model(model))

    # -- lookups ---------------------------------------------------------------------------------

    @property
    def addresses(self) -> list[Address]:
        return list(self.by_runtime.values())

    @property
    def original_names(self) -> list[str]:
        return [a.name for a in self.by_runtime.values() if not a.derived]

    def named(self, name: str, *, where: str = "adapter") -> Address:
        address = self.by_name.get(name)
        if address is None or address.derived:
            raise AdapterError(
                f"{where}: the model has no module {name!r} in its original layout; "
                f"close module names: {close_names(name, self.original_names)}"
            )
        return address

    def owner(self, runtime_key: str) -> tuple[Address, str]:
        """The address holding a runtime key (``...q_proj.lora_A.weight``) and the rest of the key."""
        parts = runtime_key.split(".")
        for cut in range(len(parts) - 1, 0, -1):
            address = self.by_runtime.get(".".join(parts[:cut]))
            if address is not None:
                return address, ".".join(parts[cut:])
        raise AdapterError(f"no module of the model holds the key {runtime_key!r}")

    def owner_by_name(self, name_key: str) -> tuple[Address, str]:
        parts = name_key.split(".")
        for cut in range(len(parts) - 1, 0, -1):
            address = self.by_name.get(".".join(parts[:cut]))
            if address is not None and not address.derived:
                return address, ".".join(parts[cut:])
        raise AdapterError(
            f"the adapter key {name_key!r} belongs to no module of the model's original layout; "
            f"close module names: {close_names(name_key, self.original_names)}"
        )

    # -- the walk --------------------------------------------------------------------------------

    def _walk(self, module: nn.Module, runtime: str, name: list[str]) -> None:
        groups = _groups(module)
        for child_name, child in module._modules.items():
            if child is None:
                continue
            path = f"{runtime}.{child_name}" if runtime else child_name
            if isinstance(module, StandIn) and child_name in module.members():
                child_path = [*name[:-1], child_name]  # a chain member stood beside the chain's slot
            else:
                child_path = [*name, child_name]
            self.runtime_paths.append(path)
            base = unwrap(child)
            if isinstance(base, StandIn) and base.forwards_only:
                continue
            if isinstance(base, StandIn) and base.members():
                self._walk(base, path, child_path)
                continue
            self._add(path, ".".join(child_path), base, groups.get(child_name), name)
            if base is child:
                self._walk(child, path, child_path)

    def _add(
        self, path: str, name: str, base: nn.Module, group: Membership | None, parent: list[str]
    ) -> None:
        prefix = ".".join(parent)
        if group is not None:
            whole = group.group if group.group is None or not prefix else f"{prefix}.{group.group}"
            members = tuple(f"{prefix}.{m}" if prefix else m for m in group.members)
            kind, extra = (
                group.kind,
                {
                    "group": whole,
                    "members": members,
                    "sizes": group.sizes,
                    "index": group.index,
                    "groups": group.groups,
                },
            )
        else:
            kind, extra = "module", {}
        linear = kind in ("slice", "concat") or (kind == "module" and _is_linear(base))
        address = Address(path, name, kind, base, linear, **extra)
        if name in self.by_name:
            raise AdapterError(
                f"two modules of the model map to the original path {name!r}: {path} and {self.by_name[name].runtime}"
            )
        self.by_runtime[path] = address
        self.by_name[name] = address


def _groups(module: nn.Module) -> dict[str, Membership]:
    """The fused/split groups among a module's children, by child name, as their stand-ins report them."""
    children = {n: unwrap(c) for n, c in module._modules.items() if c is not None}
    found: dict[str, Membership] = {}
    for child in children.values():
        if isinstance(child, LinearStandIn):
            found.update(child.memberships(module, children))
    return found


def unwrap(module: nn.Module) -> nn.Module:
    """The module a PEFT layer (or modules_to_save wrapper) stands for."""
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils.other import AuxiliaryTrainingWrapper

    if isinstance(module, BaseTunerLayer):
        return module.get_base_layer()
    if isinstance(module, AuxiliaryTrainingWrapper):
        return module.original_module
    return module


def base_model(model: nn.Module) -> nn.Module:
    """The model under a PeftModel / LoraModel wrapper (the model itself otherwise)."""
    from peft import PeftModel
    from peft.tuners.tuners_utils import BaseTuner

    if isinstance(model, PeftModel):
        model = model.base_model
    if isinstance(model, BaseTuner):
        model = model.model
    return model


def _is_linear(module: nn.Module) -> bool:
    if isinstance(module, nn.Linear):
        return True
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover - transformers is part of the peft extra
        return False
    return isinstance(module, Conv1D)


def close_names(name: str, names: list[str], n: int = 5) -> list[str]:
    """Module names near ``name``: same leaf first, then by spelling."""
    leaf = name.rpartition(".")[2]
    same_leaf = [m for m in names if m.rpartition(".")[2] == leaf][:n]
    return same_leaf or difflib.get_close_matches(name, names, n=n, cutoff=0.4) or names[:n]
