"""`splice consolidate` on a tampered ``splice-parallel.json``: one clear error naming the file and the field.

The document is checked before any shard is opened, so these tests need no process group and no shards.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from splice.cli import main
from splice.errors import CheckpointError
from splice.parallel.consolidate import consolidate
from splice.parallel.shards import FORMAT, METADATA_NAME


def document() -> dict:
    """What save_shards writes for a 2-rank model of two tensors, one sharded, one replicated."""
    return {
        "format": FORMAT,
        "version": 1,
        "world_size": 2,
        "files": ["rank-00000-of-00002.safetensors", "rank-00001-of-00002.safetensors"],
        "tensors": {
            "lm_head.weight": {"dtype": "F32", "shape": [8, 4], "dim": 0, "bounds": [[0, 4], [4, 8]]},
            "norm.weight": {"dtype": "F32", "shape": [4], "dim": None, "bounds": None},
        },
        "weight_map": {"format": "splice.weightmap", "version": 1, "rules": []},
        "source": {
            "files": [
                {"name": "model.safetensors", "metadata": {"format": "pt"}, "keys": ["lm_head.weight"]}
            ],
            "index_metadata": None,
            "tensors": {"lm_head.weight": ["F32", [8, 4]], "norm.weight": ["F32", [4]]},
        },
    }


def set_field(doc: dict, dotted: str, value: object) -> None:
    *path, last = dotted.split("/")
    for part in path:
        doc = doc[part]
    doc[last] = value


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("world_size", "2", "field world_size must be a positive int, got '2'"),
        ("world_size", 0, "field world_size must be a positive int, got 0"),
        ("files", "rank-00000", "field files must be a list of file names, got 'rank-00000'"),
        ("tensors", [], "field tensors must be a dict of tensor entries, got []"),
        (
            "tensors/lm_head.weight/bounds",
            "x",
            "field tensors['lm_head.weight'].bounds must be a list of 2 [start, stop] pairs within 0..8, got 'x'",
        ),
        (
            "tensors/lm_head.weight/bounds",
            [[0, 4]],
            "field tensors['lm_head.weight'].bounds must be a list of 2 [start, stop] pairs within 0..8, "
            "got [[0, 4]]",
        ),
        (
            "tensors/lm_head.weight/dim",
            2,
            "field tensors['lm_head.weight'].dim must be null or an int in 0..1, got 2",
        ),
        (
            "tensors/lm_head.weight/shape",
            [8, -4],
            "field tensors['lm_head.weight'].shape must be a list of non-negative ints, got [8, -4]",
        ),  # fmt: skip
        ("tensors/norm.weight/dtype", "ZZ", "field tensors['norm.weight'].dtype must be one of "),
        ("weight_map", 5, "field weight_map must be a weight map (a dict or a list of rules), got 5"),
        ("weight_map", {"rules": 5}, "field weight_map is malformed: field rules must be a list, got 5"),
        (
            "weight_map",
            {"rules": [{"sources": ["a"], "targets": ["b"], "ops": [{"op": "concat", "dim": "0"}]}]},
            "field weight_map is malformed: rule 1: op concat: field dim must be an int, got '0'",
        ),
        ("source", [1], "field source must be a dict, got [1]"),
        ("source/files", 5, "field source.files must be a list of {name, keys, metadata} dicts, got 5"),
        ("source/files", [5], "field source.files[0] must be a dict with a list of keys, got 5"),
        ("source/index_metadata", [1], "field source.index_metadata must be null or a dict, got [1]"),
        ("source/tensors", None, "field source.tensors must be a dict of [dtype, shape] pairs, got None"),
    ],
)
def test_a_mistyped_field_is_named(tmp_path, field, value, message):
    shards = tmp_path / "shards"
    shards.mkdir()
    doc = document()
    set_field(doc, field, value)
    (shards / METADATA_NAME).write_text(json.dumps(doc))
    with pytest.raises(CheckpointError) as info:
        consolidate(shards, tmp_path / "out", progress=False)
    expected = f"{shards / METADATA_NAME}: {message}"
    if message.endswith("one of "):  # the list of dtype tags follows
        assert str(info.value).startswith(expected) and str(info.value).endswith(", got 'ZZ'")
    else:
        assert str(info.value) == expected
    assert not (tmp_path / "out").exists()


def test_the_command_prints_one_line_and_exits_2(tmp_path: Path, capsys):
    shards = tmp_path / "shards"
    shards.mkdir()
    doc = document()
    doc["tensors"] = list(doc["tensors"])
    (shards / METADATA_NAME).write_text(json.dumps(doc))
    assert main(["consolidate", str(shards), str(tmp_path / "out"), "--quiet"]) == 2
    assert capsys.readouterr().err == (
        f"splice consolidate: error: {shards / METADATA_NAME}: field tensors must be a dict of tensor entries, "
        "got ['lm_head.weight', 'norm.weight']\n"
    )
