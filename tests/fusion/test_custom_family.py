"""A new family with its own stand-in, defined entirely here: no library file knows it.

It fuses a block's sibling Linears ``k`` and ``v`` into one ``kv`` Linear, and stands a `Rows`
module (this file's, not splice's `LinearSlice`) where each stood. Through the family contract
(`ModuleFusionSpec`, `FusedLayout`, `LinearStandIn`) it fuses exactly, saves the original layout
byte for byte, and takes LoRA by the original names, exactly like vanilla PEFT on the unfused model.
"""

from __future__ import annotations

from collections.abc import Mapping

import peft
import torch
import torch.nn.functional as F
from safetensors.torch import save
from torch import nn

import splice
import splice.peft as sp
from splice.fusion import (
    FusedLayout,
    FusionOptions,
    LinearStandIn,
    Membership,
    ModuleFusionSpec,
    WeightRows,
    register_fusion,
)
from splice.fusion.linear import base_layer
from splice.transforms import Concat
from splice.weightmap import Rule

NAMES = ("k", "v")


class Rows(LinearStandIn):
    """Stands where ``k`` or ``v`` was: rows ``start:stop`` of the parent's fused ``kv``."""

    def __init__(self, parent: nn.Module, index: int, sizes: tuple[int, ...], in_features: int):
        super().__init__()
        self.__dict__["parent"] = parent  # not a submodule: kv belongs to the parent
        self.index, self.sizes = index, sizes
        self.start = sum(sizes[:index])
        self.in_features, self.out_features = in_features, sizes[index]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fused = base_layer(self.parent.kv)
        rows = slice(self.start, self.start + self.out_features)
        return F.linear(x, fused.weight[rows], fused.bias[rows])

    def describe(self) -> str:
        return f"rows {self.start}:{self.start + self.out_features} of kv"

    def weight_rows(self) -> list[WeightRows]:
        fused = base_layer(self.parent.kv)
        rows = slice(self.start, self.start + self.out_features)
        return [WeightRows(fused.weight, fused.bias, rows, slice(0, self.out_features))]

    def memberships(self, parent: nn.Module, children: Mapping[str, nn.Module]) -> dict[str, Membership]:
        if self.parent is not parent or not all(isinstance(children.get(n), Rows) for n in NAMES):
            return {}
        found = {"kv": Membership("fused", members=NAMES, sizes=self.sizes)}
        for i, name in enumerate(NAMES):
            found[name] = Membership("slice", group="kv", sizes=self.sizes, index=i)
        return found


class PairSpec(ModuleFusionSpec):
    def is_fusable(self, module: nn.Module, options: FusionOptions) -> bool:
        k, v = (module._modules.get(n) for n in NAMES)
        return type(k) is nn.Linear and type(v) is nn.Linear and k.in_features == v.in_features

    def why_not(self, module: nn.Module, options: FusionOptions) -> str | None:
        k, v = (module._modules.get(n) for n in NAMES)
        if isinstance(k, nn.Linear) and isinstance(v, nn.Linear) and k.in_features != v.in_features:
            return f"k reads {k.in_features} features, v {v.in_features}"
        return None

    def _sizes(self, module: nn.Module) -> tuple[int, ...]:
        return tuple(module._modules[n].out_features for n in NAMES)

    def make_fused_module(self, module: nn.Module, options: FusionOptions) -> dict[str, nn.Module]:
        sizes, d = self._sizes(module), module.k.in_features
        rows = {n: Rows(module, i, sizes, d) for i, n in enumerate(NAMES)}
        return {"kv": nn.Linear(d, sum(sizes), device="meta"), **rows}

    def make_transforms(self, module: nn.Module, options: FusionOptions) -> list[Rule]:
        concat = Concat(0, self._sizes(module))
        return [Rule(tuple(f"{n}.{p}" for n in NAMES), (f"kv.{p}",), (concat,)) for p in ("weight", "bias")]

    def layout(self, module: nn.Module, options: FusionOptions) -> FusedLayout:
        return FusedLayout("kv", NAMES, self._sizes(module))


register_fusion("test_pair", PairSpec())


class Block(nn.Module):
    def __init__(self, d: int = 16, k: int = 8, v: int = 12):
        super().__init__()
        self.k, self.v = nn.Linear(d, k), nn.Linear(d, v)
        self.o = nn.Linear(k + v, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.o(torch.cat([torch.tanh(self.k(x)), self.v(x)], -1))


class Toy(nn.Module):
    def __init__(self, layers: int = 2):
        super().__init__()
        self.layers = nn.ModuleList(Block() for _ in range(layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


def toy(seed: int = 0) -> Toy:
    torch.manual_seed(seed)
    return Toy()


X = torch.randn(3, 5, 16, generator=torch.Generator().manual_seed(1))


def test_fuses_exactly_and_saves_the_original_layout_byte_for_byte():
    model = toy()
    original = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        expected = model(X)
    report = splice.fuse(model, ["test_pair"])
    assert report["test_pair"] == 2
    block = model.layers[0]
    assert isinstance(block.k, Rows) and block.kv.weight.shape == (20, 16)
    assert torch.equal(
        block.kv.weight, torch.cat([original["layers.0.k.weight"], original["layers.0.v.weight"]])
    )
    with torch.no_grad():
        assert torch.equal(model(X), expected)
    back = splice.original_state_dict(model)
    assert list(back) == list(original)
    assert save({k: v.contiguous() for k, v in back.items()}) == save(original)
    assert splice.unfuse(model) == 2
    assert all(torch.equal(model.state_dict()[k], original[k]) for k in original)


def test_record_and_refusal_come_from_the_family():
    model = toy()
    splice.fuse(model, ["test_pair"])
    record = splice.fusion.get_state(model).records[0]
    assert record.layout == FusedLayout("kv", ("k", "v"), (8, 12))
    odd = Toy()
    for layer in odd.layers:
        layer.v = nn.Linear(4, 12)
    try:
        splice.fuse(odd, ["test_pair"])
    except splice.FusionError as exc:
        assert "e.g. layers.0 is not fusable: k reads 16 features, v 4" in str(exc)
    else:
        raise AssertionError("a model with nothing to fuse was fused")


def test_lora_by_original_names_matches_vanilla_peft(tmp_path):
    config = dict(r=2, lora_alpha=4, target_modules=["k", "v"], init_lora_weights=False)
    unfused, fused_base = toy(), toy()
    splice.fuse(fused_base, ["test_pair"])
    torch.manual_seed(5)
    vanilla = peft.get_peft_model(unfused, peft.LoraConfig(**config))
    torch.manual_seed(5)
    fused = sp.get_peft_model(fused_base, peft.LoraConfig(**config))
    layer = fused.base_model.model.layers[0]
    assert isinstance(layer.k.base_layer, Rows)  # LoRA wraps the family's own stand-in, under the name k
    ours = {k: v for k, v in fused.state_dict().items() if "lora_" in k}
    theirs = {k: v for k, v in vanilla.state_dict().items() if "lora_" in k}
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    sp.save_adapter(fused, tmp_path / "splice")  # under the original names: vanilla PEFT's own file
    vanilla.save_pretrained(tmp_path / "vanilla")
    names = "adapter_model.safetensors"
    assert (tmp_path / "splice" / names).read_bytes() == (tmp_path / "vanilla" / names).read_bytes()
    with torch.no_grad():
        torch.testing.assert_close(fused(X), vanilla(X), atol=1e-6, rtol=0)
        fused.merge_adapter()  # merging writes into kv's rows of k and v
        vanilla.merge_adapter()
        torch.testing.assert_close(fused(X), vanilla(X), atol=1e-6, rtol=0)
        kv = layer.kv.weight
        merged = vanilla.base_model.model.layers[0]
        torch.testing.assert_close(kv, torch.cat([merged.k.weight, merged.v.weight]), atol=0, rtol=0)


def test_tensor_parallel_cuts_the_family_by_its_layout():
    from splice.parallel.sharding import build_layout

    model = toy()
    splice.fuse(model, ["test_pair"])
    layout = build_layout(model, {"layers.0.kv": "colwise"}, 2)
    [group] = layout.groups
    assert (group.path, group.fused_name, group.local_sizes) == ("layers.0", "kv", (4, 6))
    assert [p.part.name for p in group.parts] == ["k", "v"]
