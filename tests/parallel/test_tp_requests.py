"""Asking for tensor parallelism the ways transformers 5.23 accepts, and greedy generation with a static cache.

``distributed_config=DistributedConfig(...)`` (or its dict), the older standalone ``tp_plan`` /
``tp_size``, and ``device_mesh=`` (1-D, or the ``"tp"`` dimension of a (dp, tp) mesh) must all give
the logits of the single-process model; conflicting requests are refused before any rank loads.
Then ``generate(cache_implementation="static")`` under TP must give the single process's tokens,
with kv heads replicated at 4 ranks.
"""

from __future__ import annotations

import pytest
import tiny
import torch
import tp_request_scenarios
from transformers import DistributedConfig

from splice.errors import LoadError
from splice.parallel.load import _request

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="needs torch.distributed")

IDS = tiny.token_ids(batch=2, length=9)


# --------------------------------------------------------------------------------------------------
# the request, without processes


@pytest.mark.parametrize(
    ("tp_plan", "distributed_config", "tp_size", "expected"),
    [
        ("auto", None, None, ({}, None)),
        ("auto", None, 2, ({}, 2)),
        ({"model.layers.*.mlp.down_proj": "rowwise"}, None, None, ({"model.layers.*.mlp.down_proj": "rowwise"}, None)),
        (None, DistributedConfig(tp_size=4), None, ({}, 4)),
        (None, DistributedConfig(tp_size=2, tp_plan={"lm_head": "colwise_gather_output"}), None,
         ({"lm_head": "colwise_gather_output"}, 2)),
        (None, {"tp_plan": "auto"}, None, ({}, None)),  # the world, as transformers derives it
        (None, {"tp_size": 2}, None, ({}, 2)),  # the model's own plan
    ],
)  # fmt: skip
def test_request_reads_like_transformers(tp_plan, distributed_config, tp_size, expected):
    assert _request(tp_plan, distributed_config, tp_size) == expected


@pytest.mark.parametrize(
    ("tp_plan", "distributed_config", "tp_size", "message"),
    [
        ("auto", DistributedConfig(tp_size=2), None, "pass either distributed_config or the standalone"),
        (None, {"tp_size": 2}, 2, "pass either distributed_config or the standalone"),
        (None, {}, None, "asks for no tensor parallelism (tp_plan=None, tp_size=None)"),
        (None, DistributedConfig(tp_size=1), None, "asks for no tensor parallelism"),
        (None, {"tp_size": 2, "pp_size": 2}, None, "distributed_config.pp_size=2: splice's loader does"),
        ("auto", None, 0, "tp_size must be a positive int, got 0"),
        ("rowwise", None, None, 'tp_plan must be "auto" or a dict'),
    ],
)
def test_conflicting_requests_are_refused(tp_plan, distributed_config, tp_size, message):
    with pytest.raises(LoadError) as info:
        _request(tp_plan, distributed_config, tp_size)
    assert message in str(info.value)


# --------------------------------------------------------------------------------------------------
# on 2 and 4 ranks


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The single-process model: its checkpoint, logits and greedy tokens (static cache and dynamic)."""
    source = tmp_path_factory.mktemp("tp-requests") / "source"
    model = tiny.causal_lm("llama", intermediate_size=90)  # 90: padded to 92 at 4 ranks
    tiny.save(model, source)
    with torch.no_grad():
        logits = model(IDS).logits
    static = tp_request_scenarios.greedy(model, IDS, cache_implementation="static")
    dynamic = tp_request_scenarios.greedy(model, IDS)
    one_row = tp_request_scenarios.greedy(model, IDS[:1], cache_implementation="static")
    assert torch.equal(static, dynamic)  # else the test below could not tell the caches apart
    return dict(source=source, logits=logits, static=static, one_row=one_row)


@pytest.mark.parametrize("world", [2, 4])
def test_every_request_gives_the_single_process_logits_and_tokens(world, reference, tmp_path):
    ranks = tp_request_scenarios.spawn("requests", world, tmp_path, source=str(reference["source"]), ids=IDS)
    expected_tp = {name: world for name in ranks[0]["tp"]}
    if world == 4:
        expected_tp |= {"(dp, tp) device_mesh": 2, "(dp, tp) device_mesh, tp_plan": 2}
    for rank, out in enumerate(ranks):
        assert out["tp"] == expected_tp, rank
        for name, logits in out["logits"].items():
            torch.testing.assert_close(
                logits, reference["logits"], atol=1e-5, rtol=0, msg=f"{name}, rank {rank}"
            )
        assert torch.equal(out["static"], reference["static"]), rank
        assert torch.equal(out["dynamic"], reference["static"]), rank
        assert torch.equal(out["static_again"], reference["one_row"]), rank

        errors = out["errors"]
        assert (
            "pass either distributed_config or the standalone tp_plan / tp_size"
            in errors["config and tp_plan"]
        )
        assert (
            "pass either distributed_config or the standalone tp_plan / tp_size"
            in errors["config and tp_size"]
        )
        assert "asks for no tensor parallelism (tp_plan=None, tp_size=1)" in errors["tp_size=1"]
        assert "asks for no tensor parallelism (tp_plan=None, tp_size=None)" in errors["empty config"]
        assert (
            "distributed_config.fsdp_size=2: splice's loader does tensor parallelism only"
            in errors["fsdp_size"]
        )
        assert (
            f"tp_size={world // 2} disagrees with the device_mesh's tensor-parallel size {world}"
            in errors["tp_size disagrees with the mesh"]
        )
        if world == 4:
            assert (
                "device_mesh is 2-D with dimensions ('rows', 'columns'); a mesh of more than one dimension "
                'must name its tensor-parallel dimension "tp"' in errors["2-D mesh without tp"]
            )
