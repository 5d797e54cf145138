"""`LoadRequest.of`: one from_pretrained call's keywords, sorted into fields and checked before any file is read."""

from __future__ import annotations

import pytest
import torch

from splice.errors import LoadError, MetaDeviceError
from splice.loading.request import LoadRequest


class Model:
    pass


def test_keywords_are_sorted_into_fields_hub_options_and_config_overrides():
    request = LoadRequest.of(
        Model, "some/dir", fusion_config={"qkv": True}, torch_dtype="bfloat16", revision="v2", cache_dir="/c",
        rope_theta=5.0, use_safetensors=True, low_cpu_mem_usage=True, key_mapping={"a": "b"},
    )  # fmt: skip
    assert request.cls is Model and request.path == "some/dir"
    assert request.fusion_config == {"qkv": True}
    assert request.dtype == "bfloat16"  # torch_dtype= is transformers' older name for dtype=
    assert request.hub == {"revision": "v2", "cache_dir": "/c"}
    assert request.options == {"rope_theta": 5.0}  # accepted-and-ignored keywords are gone
    assert request.key_mapping == {"a": "b"}
    assert not request.tensor_parallel and request.tp_size is None


def test_dtype_wins_over_torch_dtype():
    assert LoadRequest.of(Model, "d", dtype=torch.float16, torch_dtype=torch.bfloat16).dtype == torch.float16


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"load_in_4bit": True}, "does not support load_in_4bit= (quantized loading)"),
        ({"gguf_file": "m.gguf"}, "does not support gguf_file= (GGUF checkpoints)"),
        ({"ignore_mismatched_sizes": True}, "ignore_mismatched_sizes=True is not supported"),
        ({"trust_remote_code": True}, "does not run remote code"),
        (
            {"tp_plan": "auto", "device_map": "cpu"},
            "tensor parallelism and device_map are mutually exclusive",
        ),
        ({"tp_plan": "auto", "output_loading_info": True}, "not supported with tensor parallelism"),
    ],
)
def test_refused_keywords_are_named(kwargs, message):
    with pytest.raises(LoadError) as info:
        LoadRequest.of(Model, "d", **kwargs)
    assert message in str(info.value)


def test_a_tensor_parallel_request_takes_tp_size_and_device_mesh():
    tp = LoadRequest.of(Model, "d", tp_plan="auto", tp_size=2, device_mesh="mesh")
    assert tp.tensor_parallel and (tp.tp_size, tp.device_mesh) == (2, "mesh") and tp.options == {}
    alone = LoadRequest.of(Model, "d", tp_size=2)  # as in transformers 5.23: the model's own plan on 2 ranks
    assert alone.tensor_parallel and alone.tp_size == 2 and alone.tp_plan is None and alone.options == {}
    assert not LoadRequest.of(Model, "d").tensor_parallel
    assert LoadRequest.of(Model, "d", distributed_config={"tp_size": 2}).tensor_parallel


def test_the_weights_come_from_a_path_or_from_state_dict_with_config():
    with pytest.raises(LoadError, match="cannot be passed together with a model name"):
        LoadRequest.of(Model, "d", state_dict={})
    with pytest.raises(LoadError, match=r"state_dict= needs config="):
        LoadRequest.of(Model, None, state_dict={})
    with pytest.raises(LoadError, match="must be a mapping of names to tensors, got list"):
        LoadRequest.of(Model, None, state_dict=[], config=object())
    with pytest.raises(LoadError, match="pretrained_model_name_or_path is None"):
        LoadRequest.of(Model, None)
    weights = {"w": torch.zeros(1)}
    request = LoadRequest.of(Model, None, state_dict=weights, config="cfg", output_loading_info=True)
    assert request.state_dict is weights and request.output_loading_info is True


def test_a_meta_device_context_is_refused_as_transformers_refuses_it():
    with torch.device("meta"), pytest.raises(MetaDeviceError, match="anti-pattern"):
        LoadRequest.of(Model, "d")
