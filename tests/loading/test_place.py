"""Reading plan steps (`load_step`), placing tensors (`set_tensor`), and the source file split."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from splice.checkpoint import CheckpointReader, save_state_dict
from splice.errors import LoadError
from splice.loading.place import load_step, remember_source, set_tensor, source_shards
from splice.transforms import TensorMeta
from splice.weightmap import WeightMap


def weights():
    g = torch.Generator().manual_seed(0)
    return {
        "gate.weight": torch.randn(3, 4, generator=g),
        "up.weight": torch.randn(2, 4, generator=g),
        "norm.weight": torch.randn(4, generator=g),
        "q.weight": torch.randn(2, 4, generator=g),
        "k.weight": torch.randn(2, 4, generator=g),
    }


def plan_of(rules, reader):
    metas = reader.metas()
    return WeightMap.of(rules).compile(list(metas), metas)


@pytest.mark.parametrize(
    "rule",
    [
        "norm.weight -> n.weight",  # a rename: mapped from the file
        "{gate,up}.weight -> gate_up.weight | concat(dim=0)",  # adjacent in the file: mapped as one
        "{q,k}.weight -> qk.weight | concat(dim=1)",  # read into the views of one tensor
        "q.weight -> qt.weight | transpose(0, 1)",  # run
    ],
)
def test_load_step_gives_exactly_what_the_ops_give(tmp_path, rule):
    sd = weights()
    save_state_dict(sd, tmp_path)
    with CheckpointReader(tmp_path) as reader:
        target = rule.split("->")[1].split("|")[0].strip()
        step = plan_of([rule], reader).step_for(target)
        (out,) = load_step(reader, step, {})
        (want,) = step.run([sd[k] for k in step.sources])
        assert torch.equal(out, want) and out.dtype == torch.float32


def test_load_step_converts_to_the_requested_dtype(tmp_path):
    sd = weights()
    save_state_dict(sd, tmp_path)
    with CheckpointReader(tmp_path) as reader:
        (step,) = [
            s for s in plan_of(["{gate,up}.weight -> gate_up.weight | concat(dim=0)"], reader).steps if s.ops
        ]
        (out,) = load_step(reader, step, {"gate_up.weight": torch.bfloat16})
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, torch.cat([sd["gate.weight"], sd["up.weight"]]).to(torch.bfloat16))


def test_set_tensor_makes_parameters_and_buffers():
    model = nn.BatchNorm1d(3)
    model.bias.requires_grad_(False)
    set_tensor(model, "weight", torch.full((3,), 2.0))
    set_tensor(model, "bias", torch.full((3,), 3.0))
    set_tensor(model, "running_mean", torch.full((3,), 4.0))
    assert isinstance(model.weight, nn.Parameter) and model.weight.requires_grad
    assert torch.equal(model.weight, torch.full((3,), 2.0)) and model.weight._is_hf_initialized
    assert not model.bias.requires_grad  # a frozen parameter stays frozen
    assert torch.equal(model.running_mean, torch.full((3,), 4.0)) and "running_mean" in model._buffers
    set_tensor(model, "weight", torch.arange(3))
    assert not model.weight.requires_grad  # integer tensors cannot require grad
    with pytest.raises(
        LoadError, match="the model has no parameter or buffer 'sub.weight' \\(no submodule 'sub'\\)"
    ):
        set_tensor(nn.Module(), "sub.weight", torch.zeros(1))
    with pytest.raises(LoadError, match="the model has no parameter or buffer 'scale'"):
        set_tensor(model, "scale", torch.zeros(1))


def test_the_source_split_is_given_back_only_for_the_same_tensors(tmp_path):
    sd = weights()
    save_state_dict(sd, tmp_path, max_shard_size=100)  # several files
    model = nn.Module()
    with CheckpointReader(tmp_path) as reader:
        remember_source(model, reader)
        files = {}
        for key in reader.keys():
            files.setdefault(reader.file_of(key).name, []).append(key)
        metas = reader.metas()
    assert len(files) > 1
    assert source_shards(model, metas) == [keys for _, keys in sorted(files.items())]
    changed = {**metas, "norm.weight": TensorMeta((5,), torch.float32)}
    assert source_shards(model, changed) is None
    assert source_shards(nn.Module(), metas) is None
