"""`qkv_split`: a fused ``qkv`` Linear becomes separate q, k, v Linears.

The inverse of `qkv`, for when separate projections are what you want: LoRA on q and v only, or a
per-projection quantization. The new Linears are real ``nn.Linear`` children (of the fused Linear's
class, e.g. Falcon's ``FalconLinear``); the fused slot holds a :class:`ConcatLinears` that calls them
and lays their outputs out as the fused Linear did, so the model's forward is unchanged.

Pre-fused checkpoints order the rows in one of a few layouts (`splice.transforms.interleave`): q, k and
v back to back, per head, or per kv-head group, and GPT-2 stores a transposed Conv1D weight. The
layout is read from the attention module (its class says which layout, its config-derived attributes
give the sizes) through :data:`PREFUSED`, never guessed. A module the table does not know is refused
by name; ``qkv``/``qkv_proj`` children outside the table are split as ``[q; k; v]``, sized from the
``sizes`` option, else the module's head counts (GQA, e.g. Phi-3), else three equal parts.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from splice.errors import FusionError
from splice.fusion.contract import FusedLayout, LinearStandIn, Membership, WeightRows
from splice.fusion.linear import base_layer, linear_class, linear_problem
from splice.fusion.spec import FusionOptions, ModuleFusionSpec, register_fusion
from splice.transforms import Deinterleave, Interleave, Op, Split, Transpose
from splice.weightmap import Rule

CANDIDATES: dict[str, tuple[str, str, str]] = {
    "qkv": ("q", "k", "v"),
    "qkv_proj": ("q_proj", "k_proj", "v_proj"),
}
CONV1D = "transformers.pytorch_utils.Conv1D"  # weight [in, out]: GPT-2's c_attn
PROJ = ("q_proj", "k_proj", "v_proj")


@dataclass(frozen=True)
class QKVLayout:
    """Where the parts' rows sit in one fused Linear: ``groups`` repeats of blocks of ``sizes`` rows."""

    names: tuple[str, ...]
    sizes: tuple[int, ...]  # rows of each part within one group
    groups: int = 1  # 1: back to back [q; k; v]
    transposed: bool = False  # a Conv1D weight [in, out]

    @property
    def part_sizes(self) -> tuple[int, ...]:
        return tuple(self.groups * s for s in self.sizes)


def _falcon(m: nn.Module) -> QKVLayout:
    d, heads = m.head_dim, m.num_heads
    if m.new_decoder_architecture:  # per kv head: [q x heads/kv_heads, k, v] (_split_heads)
        return QKVLayout(PROJ, (heads // m.num_kv_heads * d, d, d), groups=m.num_kv_heads)
    if m.multi_query:  # [q (all heads); k; v] with one kv head
        return QKVLayout(PROJ, (heads * d, d, d))
    return QKVLayout(PROJ, (d, d, d), groups=heads)  # per head [q k v]


def _gpt2(m: nn.Module) -> QKVLayout:
    e = m.embed_dim
    if m.is_cross_attention:  # q_attn is its own Conv1D; c_attn holds [k; v]
        return QKVLayout(PROJ[1:], (e, e), transposed=True)
    return QKVLayout(PROJ, (e, e, e), transposed=True)


def _bigcode(m: nn.Module) -> QKVLayout:
    if m.is_cross_attention:  # c_attn is [k; v] but read with head_dim splits: not a layout to claim
        raise FusionError("qkv_split: GPTBigCodeAttention.c_attn in cross-attention is not split")
    if m.multi_query:  # split((embed_dim, kv_dim, kv_dim))
        return QKVLayout(PROJ, (m.embed_dim, m.kv_dim, m.kv_dim))
    return QKVLayout(PROJ, (m.head_dim,) * 3, groups=m.num_heads)  # view(heads, 3 * head_dim)


# Attention classes whose checkpoints ship q/k/v fused, by class name or qualified name (subclasses
# inherit the entry): the fused child's name, and how the class lays out its rows (read from
# attributes its __init__ sets from the config).
PREFUSED: dict[str, tuple[str, Callable[[nn.Module], QKVLayout]]] = {
    "FalconAttention": ("query_key_value", _falcon),
    "GPTNeoXAttention": (  # view(..., heads, 3 * head_size).chunk(3): per head [q k v]
        "query_key_value",
        lambda m: QKVLayout(PROJ, (m.head_size,) * 3, groups=m.config.num_attention_heads),
    ),
    "BloomAttention": (  # view(..., heads, 3, head_dim): per head [q k v]
        "query_key_value",
        lambda m: QKVLayout(PROJ, (m.head_dim,) * 3, groups=m.num_heads),
    ),
    "PersimmonAttention": (  # view(..., heads, 3, head_dim)
        "query_key_value",
        lambda m: QKVLayout(PROJ, (m.head_dim,) * 3, groups=m.num_heads),
    ),
    "GPTNeoXJapaneseAttention": (  # view(..., heads, 3 * head_size), then thirds of each head
        "query_key_value",
        lambda m: QKVLayout(PROJ, (m.head_size,) * 3, groups=m.num_attention_heads),
    ),
    "MptAttention": ("Wqkv", lambda m: QKVLayout(PROJ, (m.hidden_size,) * 3)),  # chunk(3)
    "ModernBertAttention": (  # view(..., 3, heads, head_dim)
        "Wqkv",
        lambda m: QKVLayout(PROJ, (m.head_dim * m.config.num_attention_heads,) * 3),
    ),
    "GPTBigCodeAttention": ("c_attn", _bigcode),
    "GPT2Attention": ("c_attn", _gpt2),  # split(embed_dim) of a Conv1D output
    "DecisionTransformerGPT2Attention": ("c_attn", _gpt2),
    "ImageGPTAttention": ("c_attn", _gpt2),
    "transformers.models.openai.modeling_openai.Attention": (  # split(split_size) of a Conv1D output
        "c_attn",
        lambda m: QKVLayout(PROJ, (m.split_size,) * 3, transposed=True),
    ),
    "CodeGenAttention": (  # reshape(..., mp_num=4, -1) then split into query, VALUE, key per group
        "qkv_proj",
        lambda m: QKVLayout(("q_proj", "v_proj", "k_proj"), (m.embed_dim // 4,) * 3, groups=4),
    ),
}


PREFUSED_NAMES = tuple(dict.fromkeys(name for name, _ in PREFUSED.values() if name not in CANDIDATES))


def _prefused(module: nn.Module) -> tuple[str, Callable[[nn.Module], QKVLayout]] | None:
    for cls in type(module).__mro__:
        for name in (f"{cls.__module__}.{cls.__qualname__}", cls.__name__):
            if name in PREFUSED:
                return PREFUSED[name]
    return None


class ConcatLinears(LinearStandIn):
    """Stands where the fused qkv Linear was; calls the separate Linears and lays out their outputs as it did."""

    def __init__(
        self,
        parent: nn.Module,
        names: tuple[str, ...],
        in_features: int,
        out_features: int,
        *,
        groups: int = 1,
        transposed: bool = False,
    ):
        super().__init__()
        self.__dict__["parent"] = parent  # the Linears are the parent's children (so LoRA can wrap them)
        self.names = tuple(names)
        self.in_features, self.out_features = in_features, out_features
        self.groups, self.transposed = groups, transposed

    def _join(self, tensors: list[torch.Tensor], dim: int) -> torch.Tensor:
        return Interleave(dim, self.groups).apply(tensors)[0] if self.groups > 1 else torch.cat(tensors, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._join([getattr(self.parent, n)(x) for n in self.names], -1)

    @property
    def weight(self) -> torch.Tensor:
        """The fused weight in the fused layout (computed on access)."""
        weight = self._join([base_layer(getattr(self.parent, n)).weight for n in self.names], 0)
        return weight.T if self.transposed else weight

    @property
    def bias(self) -> torch.Tensor | None:
        biases = [base_layer(getattr(self.parent, n)).bias for n in self.names]
        return None if biases[0] is None else self._join(biases, 0)

    def rows(self, index: int) -> torch.Tensor:
        """The rows of the fused output that part ``index`` produces, in order."""
        sizes = [base_layer(getattr(self.parent, n)).out_features for n in self.names]
        positions = self._join([torch.full((s,), i) for i, s in enumerate(sizes)], 0)
        return torch.nonzero(positions == index).flatten()

    def describe(self) -> str:
        return f"the concatenation of the split {', '.join(self.names)}"

    def weight_rows(self) -> list[WeightRows]:
        rows, offset = [], 0
        for index, name in enumerate(self.names):
            part = base_layer(getattr(self.parent, name))
            size = part.weight.shape[0]
            out = (
                self.rows(index) if self.groups > 1 else slice(offset, offset + size)
            )  # interleaved: indices
            rows.append(WeightRows(part.weight, part.bias, slice(0, size), out))
            offset += size
        return rows

    def memberships(self, parent: nn.Module, children: Mapping[str, nn.Module]) -> dict[str, Membership]:
        if self.parent is not parent or not all(n in children for n in self.names):
            return {}
        whole = next(n for n, c in children.items() if c is self)
        sizes = tuple(children[n].out_features for n in self.names)
        found = {whole: Membership("concat", members=self.names, sizes=sizes, groups=self.groups)}
        for index, part in enumerate(self.names):
            found[part] = Membership("part", group=whole, sizes=sizes, index=index, groups=self.groups)
        return found

    def extra_repr(self) -> str:
        layout = f" in {self.groups} groups" if self.groups > 1 else ""
        return f"in_features={self.in_features}, out_features={self.out_features}, concatenates {', '.join(self.names)}{layout}"


@dataclass(frozen=True)
class QKVSplitOptions(FusionOptions):
    name: str | None = None
    """The fused Linear to split (default: ``qkv`` or ``qkv_proj``, or the pre-fused name of a known attention)."""
    names: tuple[str, ...] | None = None
    """Names of the new Linears (default: q/k/v for ``qkv``, q_proj/k_proj/v_proj otherwise)."""
    sizes: tuple[int, ...] | None = None
    """Output sizes of the parts (default: from the module's head counts, else equal thirds)."""


class QKVSplitSpec(ModuleFusionSpec):
    name: ClassVar[str] = "qkv_split"
    options_class: ClassVar[type[FusionOptions]] = QKVSplitOptions

    def check_options(self, family: str, options: QKVSplitOptions) -> None:  # type: ignore[override]
        if (
            options.names is not None
            and options.sizes is not None
            and len(options.names) != len(options.sizes)
        ):
            raise FusionError(
                f"{family!r}: options names {options.names} and sizes {options.sizes} differ in length"
            )
        if options.names is not None and options.name is None:
            raise FusionError(f"{family!r}: option names needs option name (the fused Linear to split)")

    def _target(self, module: nn.Module, options: QKVSplitOptions) -> tuple[str, QKVLayout] | None:
        prefused = _prefused(module)
        if prefused is not None and options.name in (None, prefused[0]) and prefused[0] in module._modules:
            name, read = prefused
            if options.sizes is not None:
                raise FusionError(
                    f"qkv_split: {type(module).__name__}.{name} has a known layout (read from its class and "
                    f"config); drop option sizes={list(options.sizes)}"
                )
            return name, self._known(module, name, read, options)
        if prefused is None and options.name is None:
            unknown = [n for n in PREFUSED_NAMES if isinstance(module._modules.get(n), nn.Module)]
            if unknown:
                raise FusionError(
                    f"qkv_split: {type(module).__name__}.{unknown[0]} looks like a fused q/k/v projection, but how "
                    f"{type(module).__name__} orders its rows is not known to splice (splice.fusion.qkv_split.PREFUSED); "
                    "if they are [q; k; v] back to back, pass the options name and sizes"
                )
        spellings = (
            {options.name: options.names or CANDIDATES.get(options.name, ("q", "k", "v"))}
            if options.name
            else CANDIDATES
        )
        for name, names in spellings.items():
            linear = module._modules.get(name)
            if linear_problem(linear, name) is not None or any(n in module._modules for n in names):
                continue
            sizes = (
                options.sizes
                or _sizes_from_heads(module, linear.out_features)
                or _thirds(linear.out_features, len(names))
            )
            if sizes and sum(sizes) == linear.out_features and len(sizes) == len(names):
                return name, QKVLayout(tuple(names), tuple(sizes))
        return None

    def _known(
        self, module: nn.Module, name: str, read: Callable[[nn.Module], QKVLayout], options: QKVSplitOptions
    ) -> QKVLayout:
        fused = module._modules[name]
        where = f"{type(module).__name__}.{name}"
        layout = read(module)
        if options.names is not None:
            if len(options.names) != len(layout.names):
                raise FusionError(
                    f"qkv_split: {where} holds {len(layout.names)} parts ({', '.join(layout.names)}); option "
                    f"names {list(options.names)} has {len(options.names)}"
                )
            layout = QKVLayout(tuple(options.names), layout.sizes, layout.groups, layout.transposed)
        if layout.transposed:
            problem = None if _qualname(fused) == CONV1D else f"{name} is a {_qualname(fused)}, not a Conv1D"
        else:
            problem = linear_problem(fused, name)
        out = fused.weight.shape[1] if layout.transposed else fused.weight.shape[0]
        if problem is None and sum(layout.part_sizes) != out:
            problem = (
                f"its layout has {layout.groups} x {list(layout.sizes)} rows but {name} has {out} outputs"
            )
        clash = [n for n in layout.names if n in module._modules]
        if problem is None and clash:
            problem = f"it already has a child named {clash[0]}"
        if problem is not None:
            raise FusionError(f"qkv_split: cannot split {where}: {problem}")
        return layout

    def is_fusable(self, module: nn.Module, options: QKVSplitOptions) -> bool:  # type: ignore[override]
        return self._target(module, options) is not None

    def describe_candidates(self, options: QKVSplitOptions) -> str:  # type: ignore[override]
        names = [options.name] if options.name else list(CANDIDATES)
        known = ", ".join(sorted({f"{n} of {cls}" for cls, (n, _) in PREFUSED.items()}))
        return (
            f"nn.Linear children named {' or '.join(names)} whose output splits into "
            f"{options.sizes or 'q/k/v sizes'}, nor a pre-fused attention ({known})"
        )

    def make_fused_module(self, module: nn.Module, options: QKVSplitOptions) -> dict[str, nn.Module]:  # type: ignore[override]
        name, layout = self._target(module, options)  # type: ignore[misc]
        fused = module._modules[name]
        in_features = fused.weight.shape[0] if layout.transposed else fused.weight.shape[1]
        cls = nn.Linear if layout.transposed else linear_class(fused)  # FalconLinear stays FalconLinear
        bias = fused.bias is not None
        parts = {
            n: cls(in_features, size, bias=bias, device="meta", dtype=fused.weight.dtype)
            for n, size in zip(layout.names, layout.part_sizes)
        }
        stand_in = ConcatLinears(
            module,
            layout.names,
            in_features,
            sum(layout.part_sizes),
            groups=layout.groups,
            transposed=layout.transposed,
        )
        return {**parts, name: stand_in}

    def make_transforms(self, module: nn.Module, options: QKVSplitOptions) -> list[Rule]:  # type: ignore[override]
        name, layout = self._target(module, options)  # type: ignore[misc]
        split: Op = (
            Deinterleave(0, layout.groups, layout.sizes) if layout.groups > 1 else Split(0, layout.sizes)
        )
        weight_ops = ((Transpose(0, 1),) if layout.transposed else ()) + (split,)
        rules = [Rule((f"{name}.weight",), tuple(f"{n}.weight" for n in layout.names), weight_ops)]
        if module._modules[name].bias is not None:
            rules.append(Rule((f"{name}.bias",), tuple(f"{n}.bias" for n in layout.names), (split,)))
        return rules

    def layout(self, module: nn.Module, options: QKVSplitOptions) -> FusedLayout:  # type: ignore[override]
        name, found = self._target(module, options)  # type: ignore[misc]
        return FusedLayout(name, found.names, found.part_sizes, found.groups, found.transposed, split=True)


def _qualname(module: nn.Module | None) -> str:
    cls = type(module)
    return f"{cls.__module__}.{cls.__qualname__}"


def _sizes_from_heads(module: nn.Module, total: int) -> tuple[int, int, int] | None:
    config = getattr(module, "config", None)
    head_dim = getattr(module, "head_dim", None) or getattr(config, "head_dim", None)
    heads = getattr(module, "num_heads", None) or getattr(config, "num_attention_heads", None)
    kv_heads = getattr(module, "num_key_value_heads", None) or getattr(config, "num_key_value_heads", None)
    if not all(isinstance(v, int) and v > 0 for v in (head_dim, heads, kv_heads)):
        return None
    sizes = (heads * head_dim, kv_heads * head_dim, kv_heads * head_dim)
    return sizes if sum(sizes) == total else None


def _thirds(total: int, parts: int) -> tuple[int, ...] | None:
    return (total // parts,) * parts if total % parts == 0 else None


register_fusion("qkv_split", QKVSplitSpec())
