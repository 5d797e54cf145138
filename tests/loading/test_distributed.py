"""The declared interface a sharded model's saver implements, and the one lookup saving uses."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from splice.loading.distributed import (
    DistributedWeights,
    attach_distributed,
    distributed_weights,
    num_parameters,
)
from splice.parallel.fsdp import FullyShardedWeights
from splice.parallel.state import ParallelState


class Recorded:
    def __init__(self, count):
        self.num_parameters = count
        self.calls = []

    def gather_state_dict(self, model, original=True):
        self.calls.append(("gather", original))
        return {"w": torch.zeros(1)}

    def finish_save(self, error):
        self.calls.append(("finish", error))


def tied():
    model = nn.Sequential(nn.Embedding(5, 3), nn.Linear(3, 5, bias=False))
    model[1].weight = model[0].weight
    return model


def test_the_parameter_count_counts_tied_tensors_once_or_takes_the_declared_count():
    model = tied()
    assert num_parameters(model) == 15
    attach_distributed(model, Recorded(None))
    assert num_parameters(model) == 15
    attach_distributed(model, Recorded(7))
    assert num_parameters(model) == 7


def test_attach_refuses_what_does_not_implement_the_interface_and_lookup_finds_what_was_attached():
    model = nn.Linear(2, 2)
    assert distributed_weights(model) is None
    with pytest.raises(TypeError, match="object does not implement splice.loading.DistributedWeights"):
        attach_distributed(model, object())
    weights = Recorded(1)
    attach_distributed(model, weights)
    assert distributed_weights(model) is weights
    assert "_splice_distributed" not in vars(type(model))  # on the instance, never the class


def test_splices_parallel_and_fsdp_savers_implement_it():
    assert isinstance(FullyShardedWeights(), DistributedWeights)
    state = ParallelState(
        mesh=None, layout=None, checkpoint_map=None, tensors={}, source={}, num_parameters=9
    )
    assert isinstance(state, DistributedWeights)
    model = nn.Linear(2, 2)
    state.install(model)
    assert distributed_weights(model) is state and num_parameters(model) == 9
