"""`ModuleFusionSpec`: what a fusion family is, its options, and the registry of families.

A family finds the modules it can fuse, builds their fused replacement *per instance*, and says how
weights move between the two layouts as WeightMap rules. The surgery in `splice.fusion.surgery` does
the rest (moving weights, freeing originals, undoing) in one generic way for every family.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

from torch import nn

from splice.errors import FusionError
from splice.fusion.contract import FusedLayout
from splice.transforms.base import conform, describe_type
from splice.weightmap import Rule


@dataclass(frozen=True)
class FusionOptions:
    """Options every family accepts. Families subclass this dataclass to add their own."""

    modules: str | None = None
    """A regex; only modules whose dotted path it matches (``re.search``) are fused."""


class ModuleFusionSpec:
    """One fusion family. Subclass it, implement the four members below, and register an instance.

    - ``target_modules_patterns``: globs over module paths of the modules to consider (the *parents*
      whose children get fused), e.g. ``("*",)`` or ``("model.layers.*",)``.
    - ``is_fusable(module, options)``: whether this module can be fused.
    - ``make_fused_module(module, options)``: the children to set on ``module``, by attribute name:
      new fused modules and the stand-ins that replace the originals. Build them on the meta device;
      the surgery fills their weights by running the rules below on the originals.
    - ``make_transforms(module, options)``: WeightMap rules over keys relative to ``module``, from the
      original layout to the fused one. Ops must be resolved (sizes known), so they invert exactly.

    Optional hooks: ``refusal`` and ``why_not`` (what the errors say), ``layout`` (where fused parts sit,
    for TP and LoRA), ``tp_group`` (what TP cuts together in an unfused model). Modules the family
    installs in place of originals subclass `splice.fusion.contract.StandIn` (or `LinearStandIn`), so
    PEFT, TP and kernels handle them without knowing the family. A family lives in one file that ends
    with ``register_fusion("name", Spec())``.
    """

    name: ClassVar[str] = ""
    options_class: ClassVar[type[FusionOptions]] = FusionOptions
    target_modules_patterns: tuple[str, ...] = ("*",)
    requires_tensors: ClassVar[bool] = True  # a fusion whose rules move no tensor is a mistake, usually

    def is_fusable(self, module: nn.Module, options: FusionOptions) -> bool:
        raise NotImplementedError

    def make_fused_module(self, module: nn.Module, options: FusionOptions) -> dict[str, nn.Module]:
        raise NotImplementedError

    def make_transforms(self, module: nn.Module, options: FusionOptions) -> list[Rule]:
        raise NotImplementedError

    def refusal(self, module: nn.Module, options: FusionOptions) -> str | None:
        """Why ``module``, one this family claims, cannot be fused; None when it can or is not one of them.

        A family fuses every module it claims or none: ``fuse`` refuses when any claimed module has a
        reason here (unless ``modules=`` leaves it out). The default claims nothing beyond
        ``is_fusable``, so a family that does not implement this skips modules it cannot fuse.
        """
        return None

    def describe_candidates(self, options: FusionOptions) -> str:
        """What this family looks for, for the error raised when it finds nothing."""
        return f"modules where {type(self).__name__}.is_fusable() is true"

    def why_not(self, module: nn.Module, options: FusionOptions) -> str | None:
        """Why ``module`` is not fusable, for the error raised when the family finds nothing to fuse.

        Called on the modules the family looked at, in order; the first reason is shown. None: nothing
        to say about this module (the default).
        """
        return None

    def layout(self, module: nn.Module, options: FusionOptions) -> FusedLayout | None:
        """Where the parts of this fused instance sit in their whole (`FusedLayout`), recorded for TP and LoRA.

        None (the default) for a family whose parts are not rows of one whole: tensor parallelism then
        leaves its modules replicated.
        """
        return None

    def tp_group(self, module: nn.Module) -> FusedLayout | None:
        """Unfused children of ``module`` that tensor parallelism must cut together, laid out as this family would fuse them.

        An attention's separate q/k/v Linears, say: cut by heads, with the k/v heads replicated when
        there are fewer than ranks. None (the default): this family knows no such group here.
        """
        return None

    # -- options -------------------------------------------------------------------------------------

    def parse_options(self, family: str, value: Any) -> FusionOptions:
        if value is True or value is None:
            return self.options_class()
        if isinstance(value, self.options_class):
            return value
        if not isinstance(value, Mapping):
            raise FusionError(f"{family!r}: options must be True or a dict, got {value!r}")
        fields = {f.name: f for f in dataclasses.fields(self.options_class)}
        for key in value:
            if key not in fields:
                close = difflib.get_close_matches(str(key), list(fields), n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise FusionError(f"{family!r}: unknown option {key!r}{hint}; options are {sorted(fields)}")
        declared = _declared_types(self.options_class)
        for key, item in value.items():
            hint = declared.get(key)
            if item is not None and hint is not None and not conform(item, hint)[0]:
                raise FusionError(f"{family!r}: option {key} must be {describe_type(hint)}, got {item!r}")
        options = self.options_class(**{k: _tuple_lists(v) for k, v in value.items()})
        if options.modules is not None:
            try:
                re.compile(options.modules)
            except re.error as exc:
                raise FusionError(
                    f"{family!r}: option modules={options.modules!r} is not a valid regex: {exc}"
                ) from None
        self.check_options(family, options)
        return options

    def check_options(self, family: str, options: FusionOptions) -> None:
        """Validate family-specific options; raise FusionError naming the option."""

    def options_to_json(self, options: FusionOptions) -> Any:
        data = {
            f.name: list(v) if isinstance(v, tuple) else v
            for f in dataclasses.fields(options)
            if (v := getattr(options, f.name)) != f.default
        }
        return data or True


def _tuple_lists(value: Any) -> Any:
    if isinstance(value, list):
        return tuple(_tuple_lists(v) for v in value)
    return value


def _declared_types(options_class: type[FusionOptions]) -> dict[str, Any]:
    try:
        return typing.get_type_hints(options_class)
    except (NameError, TypeError):  # a user's annotation that cannot be resolved: no type checks
        return {}


# --------------------------------------------------------------------------------------------------
# the registry: built-in families are registered when splice.fusion is imported; users add theirs.

_FAMILIES: dict[str, ModuleFusionSpec] = {}


def register_fusion(name: str, spec: ModuleFusionSpec, *, replace: bool = False) -> None:
    """Make ``name`` usable in ``fusion_config``. Registering never changes any model or class."""
    if not isinstance(spec, ModuleFusionSpec):
        raise FusionError(
            f"register_fusion({name!r}, ...) needs a ModuleFusionSpec instance, got {type(spec).__name__}"
        )
    if name in _FAMILIES and not replace and _FAMILIES[name] is not spec:
        raise FusionError(f"fusion family {name!r} is already registered; pass replace=True to override it")
    _FAMILIES[name] = spec


def registered_families() -> dict[str, ModuleFusionSpec]:
    return dict(_FAMILIES)


def resolve_config(config: Any) -> list[tuple[str, ModuleFusionSpec, FusionOptions]]:
    """Normalize a fusion config into ``(family, spec, options)`` triples, validating everything first.

    Accepts ``["qkv", "gate_up"]``, ``{"qkv": True, "gate_up": {"modules": "..."}}``, and
    ``{"my_family": MySpec()}`` (a spec passed per call, no registration needed).
    """
    if isinstance(config, str):
        config = [config]
    if isinstance(config, (list, tuple)):
        config = {name: True for name in config}
    if not isinstance(config, Mapping):
        raise FusionError(f"a fusion config is a list of family names or a dict, got {type(config).__name__}")
    resolved = []
    for family, value in config.items():
        if value is False:
            continue
        if isinstance(value, ModuleFusionSpec):
            resolved.append((family, value, value.options_class()))
            continue
        spec = _FAMILIES.get(family)
        if spec is None:
            known = sorted(_FAMILIES)
            close = difflib.get_close_matches(str(family), known, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise FusionError(f"unknown fusion family {family!r}{hint}; known families: {', '.join(known)}")
        resolved.append((family, spec, spec.parse_options(family, value)))
    return resolved
