"""`splice.fusion.contract`: the fused-layout record refuses inconsistent facts; stand-ins name what they lack."""

from __future__ import annotations

import pytest
import torch

from splice.errors import FusionError
from splice.fusion import FusedLayout, LinearStandIn, WeightRows


def test_fused_layout_refuses_inconsistent_facts():
    with pytest.raises(
        FusionError, match=r"FusedLayout of qkv_proj: names \('q', 'k'\) and sizes \(4,\) differ"
    ):
        FusedLayout("qkv_proj", ("q", "k"), (4,))
    with pytest.raises(FusionError, match="FusedLayout of qkv_proj: head_dim and heads go together"):
        FusedLayout("qkv_proj", ("q", "k"), (4, 4), head_dim=2)


class Bare(LinearStandIn):
    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.__dict__["w"], self.__dict__["b"] = weight, bias
        self.in_features, self.out_features = weight.shape[1], 3

    def weight_rows(self) -> list[WeightRows]:  # rows 4:6 and 0:1 of the real weight, in that order
        return [
            WeightRows(self.w, self.b, slice(4, 6), slice(0, 2)),
            WeightRows(self.w, self.b, slice(0, 1), slice(2, 3)),
        ]


def test_stand_in_weight_and_bias_are_read_from_its_weight_rows():
    weight, bias = torch.randn(6, 5), torch.randn(6)
    stand_in = Bare(weight, bias)
    assert torch.equal(stand_in.weight, torch.cat([weight[4:6], weight[0:1]]))
    assert torch.equal(stand_in.bias, torch.cat([bias[4:6], bias[0:1]]))
    assert Bare(weight, None).bias is None
    with pytest.raises(
        NotImplementedError, match="Bare cannot be tensor-parallel: it implements no read_rows"
    ):
        stand_in.read_rows(0, 2)
    with pytest.raises(NotImplementedError, match="Bare must implement memberships"):
        stand_in.memberships(stand_in, {})
