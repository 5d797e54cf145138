"""Hostile files: names that lead out of the directory, links out of it, brace bombs, recorded ops that
allocate more than the file holds, unreadable text files. Every case is refused with one clear line, and
nothing outside the directory given is read, echoed or copied.

Each hostile file is crafted in ``tmp_path``; the file "outside" the checkpoint is a sibling folder's
secret, never a system file.
"""

from __future__ import annotations

import json
import os
import re
import stat
from pathlib import Path

import pytest
import torch

from splice.checkpoint import CheckpointReader, load_state_dict, save_state_dict
from splice.checkpoint.paths import member
from splice.cli import main
from splice.convert import convert_checkpoint
from splice.errors import CheckpointError
from splice.parallel.consolidate import consolidate
from splice.parallel.shards import FORMAT, METADATA_NAME, RANK_KEY, WORLD_KEY
from splice.transforms import bitwise_equal

SECRET = b"root:$6$very-secret-hash:19000:0:99999:7:::\n"
MAP = {"rules": ["{a,b} -> ab | concat(dim=0)"]}


def tensors(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {name: torch.randn(2, 4, generator=g) for name in ("a", "b", "c")}


@pytest.fixture
def secret(tmp_path) -> Path:
    """A private file outside every checkpoint directory of the test."""
    path = tmp_path / "outside" / "shadow"
    path.parent.mkdir()
    path.write_bytes(SECRET)
    path.chmod(0o600)
    return path


def sharded(folder: Path, weight_map: dict[str, str]) -> Path:
    """A directory with two real shards and an index mapping tensors to the given (possibly hostile) names."""
    sd = tensors()
    save_state_dict({"a": sd["a"], "b": sd["b"]}, folder / "one")
    save_state_dict({"c": sd["c"]}, folder / "two")
    (folder / "one" / "model.safetensors").rename(folder / "model-00001-of-00002.safetensors")
    (folder / "two" / "model.safetensors").rename(folder / "model-00002-of-00002.safetensors")
    for sub in ("one", "two"):
        (folder / sub).rmdir()
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map})
    )
    return folder


GOOD_INDEX = {
    "a": "model-00001-of-00002.safetensors",
    "b": "model-00001-of-00002.safetensors",
    "c": "model-00002-of-00002.safetensors",
}


# ------------------------------------------------------------------------------ names leaving the directory


@pytest.mark.parametrize(
    ("name", "why"),
    [
        ("../outside/shadow", "a '..' component"),
        ("sub/../../outside/shadow", "a '..' component"),
        ("{secret}", "an absolute path"),
        ("C:\\model.safetensors", "an absolute path"),
        ("sub\\model.safetensors", "a backslash"),
        ("./model-00002-of-00002.safetensors", "an empty or '.' component"),
        ("", "must be a non-empty string"),
    ],
)
def test_an_index_naming_a_file_outside_is_refused_without_reading_it(tmp_path, secret, capsys, name, why):
    name = name.format(secret=secret)
    src = sharded(tmp_path / "src", {**GOOD_INDEX, "c": name})
    with pytest.raises(CheckpointError, match=f"the shard file of tensor 'c' .*{why}") as info:
        CheckpointReader(src)
    assert SECRET.decode()[:8] not in str(info.value)
    # the same through the CLI, which reads it with the same reader
    (tmp_path / "map.json").write_text(json.dumps(MAP))
    assert main(["convert", str(src), str(tmp_path / "dst"), "--map", str(tmp_path / "map.json")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and why in err and "root:" not in err
    assert not (tmp_path / "dst").exists()


def test_a_folder_in_a_shard_name_that_links_outside_is_refused(tmp_path, secret):
    src = sharded(tmp_path / "src", GOOD_INDEX)
    (src / "sub").symlink_to(secret.parent, target_is_directory=True)
    (src / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {**GOOD_INDEX, "c": "sub/shadow"}})
    )
    with pytest.raises(CheckpointError, match="'sub/shadow' leads out of .* through a symbolic link"):
        CheckpointReader(src)


def test_a_shard_that_is_a_symlink_is_read_as_in_the_hugging_face_cache(tmp_path):
    """snapshots/<rev>/model-*.safetensors -> ../../blobs/<hash>: the links leave the snapshot, and that is fine."""
    repo = tmp_path / "models--org--tiny"
    built = sharded(tmp_path / "built", GOOD_INDEX)
    snapshot = repo / "snapshots" / "0123abcd"
    (repo / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    for n, path in enumerate(sorted(built.iterdir())):
        blob = repo / "blobs" / f"blob{n}"
        path.rename(blob)
        (snapshot / path.name).symlink_to(Path("../../blobs") / blob.name)
    (tmp_path / "config").write_text('{"model_type": "llama"}')  # a side file, linked the same way
    (tmp_path / "config").rename(repo / "blobs" / "config")
    (snapshot / "config.json").symlink_to("../../blobs/config")
    reader_tensors = load_state_dict(snapshot)
    expected = tensors()
    assert all(bitwise_equal(reader_tensors[k], expected[k]) for k in expected)

    (tmp_path / "map.json").write_text(json.dumps(MAP))
    report = convert_checkpoint(snapshot, tmp_path / "dst", tmp_path / "map.json", progress=False)
    assert report.warnings == []
    copied = tmp_path / "dst" / "config.json"
    assert not copied.is_symlink() and copied.read_text() == '{"model_type": "llama"}'
    out = load_state_dict(tmp_path / "dst")
    assert bitwise_equal(out["ab"], torch.cat([expected["a"], expected["b"]]))


def test_member_keeps_plain_names_and_nested_folders(tmp_path):
    (tmp_path / "sub").mkdir()
    assert member(tmp_path, "sub/x.safetensors", "index") == tmp_path / "sub" / "x.safetensors"
    assert member(tmp_path, "x..y.safetensors", "index") == tmp_path / "x..y.safetensors"


# ------------------------------------------------------------------------------ side files that are links


def test_convert_does_not_copy_a_side_file_linking_outside(tmp_path, secret, capsys):
    src = tmp_path / "src"
    save_state_dict(tensors(), src)
    (src / "tokenizer.json").symlink_to(secret)
    (src / "config.json").write_text("{}")
    (src / "config.json").chmod(0o600)
    (src / "inside.json").symlink_to("config.json")  # a link that stays inside is followed
    (tmp_path / "map.json").write_text(json.dumps(MAP))
    assert main(["convert", str(src), str(tmp_path / "dst"), "--map", str(tmp_path / "map.json")]) == 0
    err = capsys.readouterr().err
    assert (
        f"warning: {src / 'tokenizer.json'} is a symbolic link to {secret}, outside {src}; not copied" in err
    )
    dst = tmp_path / "dst"
    assert sorted(p.name for p in dst.iterdir()) == ["config.json", "inside.json", "model.safetensors"]
    for name in ("config.json", "inside.json"):  # copies never more readable than the file they copy
        assert stat.S_IMODE((dst / name).stat().st_mode) == 0o600 and (dst / name).read_text() == "{}"
    assert all(SECRET not in p.read_bytes() for p in dst.iterdir())


def shards_dir(folder: Path) -> Path:
    """What save_shards writes for 2 ranks: ``lm_head.weight`` split by rows, ``norm.weight`` on rank 0."""
    g = torch.Generator().manual_seed(1)
    head, norm = torch.randn(8, 4, generator=g), torch.randn(4, generator=g)
    files = ["rank-00000-of-00002.safetensors", "rank-00001-of-00002.safetensors"]
    for rank, name in enumerate(files):
        piece = {"lm_head.weight": head[4 * rank : 4 * rank + 4]} | (
            {"norm.weight": norm} if rank == 0 else {}
        )
        save_state_dict(piece, folder / f"r{rank}", metadata={RANK_KEY: str(rank), WORLD_KEY: "2"})
        (folder / f"r{rank}" / "model.safetensors").rename(folder / name)
        (folder / f"r{rank}").rmdir()
    document = {
        "format": FORMAT,
        "version": 1,
        "world_size": 2,
        "files": files,
        "tensors": {
            "lm_head.weight": {"dtype": "F32", "shape": [8, 4], "dim": 0, "bounds": [[0, 4], [4, 8]]},
            "norm.weight": {"dtype": "F32", "shape": [4], "dim": None, "bounds": None},
        },
        "weight_map": {"format": "splice.weightmap", "version": 1, "rules": []},
        "source": {
            "files": [
                {
                    "name": "model.safetensors",
                    "metadata": {"format": "pt"},
                    "keys": ["lm_head.weight", "norm.weight"],
                }
            ],
            "index_metadata": None,
            "tensors": {"lm_head.weight": ["F32", [8, 4]], "norm.weight": ["F32", [4]]},
        },
    }
    (folder / METADATA_NAME).write_text(json.dumps(document))
    return folder


def edit(folder: Path, change) -> None:
    document = json.loads((folder / METADATA_NAME).read_text())
    change(document)
    (folder / METADATA_NAME).write_text(json.dumps(document))


def test_consolidate_refuses_shard_names_outside_and_skips_linked_side_files(tmp_path, secret):
    shards = shards_dir(tmp_path / "shards")
    (shards / "tokenizer.json").symlink_to(secret)
    (shards / "config.json").write_text("{}")
    report = consolidate(shards, tmp_path / "out", progress=False)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["config.json", "model.safetensors"]
    assert report.warnings == [f"{shards / 'tokenizer.json'} is a symbolic link to {secret}, outside {shards}; not copied "
                               "(links out of the checkpoint directory are not followed; copy the file itself if it belongs there)"]  # fmt: skip

    edit(shards, lambda d: d["files"].__setitem__(1, "../outside/shadow"))
    with pytest.raises(
        CheckpointError, match=r"the shard file of rank 1 '../outside/shadow' is refused \(a '..' component\)"
    ):
        consolidate(shards, tmp_path / "out2", progress=False)
    edit(shards, lambda d: d["files"].__setitem__(1, str(secret)))
    with pytest.raises(CheckpointError, match=r"is refused \(an absolute path\)"):
        consolidate(shards, tmp_path / "out2", progress=False)
    assert not (tmp_path / "out2").exists()


def test_save_pretrained_keeps_links_in_the_target_as_links(tmp_path, secret, monkeypatch):
    transformers = pytest.importorskip("transformers")
    import splice

    config = transformers.LlamaConfig(
        hidden_size=16, intermediate_size=24, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, vocab_size=32,
    )  # fmt: skip
    model = transformers.LlamaForCausalLM(config)
    out = tmp_path / "out"
    splice.save_pretrained(model, out)
    (out / "tokenizer.json").symlink_to(secret)
    (out / "extra").mkdir()
    (out / "extra" / "vocab.txt").symlink_to(secret)

    def cross_device(*args, **kwargs):
        raise OSError(18, "Invalid cross-device link")  # hard links fail: the carry-over falls back to copies

    monkeypatch.setattr(os, "link", cross_device)
    splice.save_pretrained(model, out)  # carries the target's other files over
    assert os.readlink(out / "tokenizer.json") == str(secret)
    assert os.readlink(out / "extra" / "vocab.txt") == str(secret)
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600 and secret.read_bytes() == SECRET


# ------------------------------------------------------------------------------ brace bombs and ReDoS


def bomb(n: int) -> str:
    return "x" + "{a,b}" * n + " -> y" + "{a,b}" * n


@pytest.mark.parametrize("n", [13, 40])
def test_a_brace_bomb_in_a_map_file_is_refused_before_expanding(tmp_path, capsys, n):
    save_state_dict(tensors(), tmp_path / "src")
    (tmp_path / "map.json").write_text(json.dumps({"rules": [bomb(n)]}))
    assert (
        main(["convert", str(tmp_path / "src"), str(tmp_path / "dst"), "--map", str(tmp_path / "map.json")])
        == 2
    )
    err = capsys.readouterr().err
    assert "expands into more than 4096 patterns; write a '*' or '#' wildcard instead" in err
    assert err.count("\n") == 1 and len(err) < 400


def test_a_brace_bomb_recorded_in_a_checkpoint_or_in_splice_parallel_json_is_refused(tmp_path):
    bombed = json.dumps({"format": "splice.weightmap", "version": 1, "rules": [bomb(40)]})
    save_state_dict(tensors(), tmp_path / "src", metadata={"format": "pt", "splice.weightmap": bombed})
    with pytest.raises(
        CheckpointError, match="the recorded splice.weightmap is unreadable: .* expands into more than 4096"
    ):
        convert_checkpoint(tmp_path / "src", tmp_path / "dst", None, reverse=True, progress=False)
    shards = shards_dir(tmp_path / "shards")
    edit(shards, lambda d: d.__setitem__("weight_map", json.loads(bombed)))
    with pytest.raises(
        CheckpointError, match="field weight_map is malformed: .* expands into more than 4096"
    ):
        consolidate(shards, tmp_path / "out", progress=False)


@pytest.mark.parametrize(
    ("pattern", "message"),
    [
        ("a.*x*x*x*x*x*x*x*x*x*x*x*x*x*x*x*x*x*x*x*x*x*x.b", "at most one wildcard ('*', '**' or '#') per dotted component, found '*x*x"),
        ("**.**.**.**.**.**.**.**.**.**.**.**.x", "at most one '**' per pattern"),
    ],
)  # fmt: skip
def test_patterns_that_would_backtrack_for_hours_are_refused(pattern, message):
    from splice.errors import WeightMapError
    from splice.weightmap import WeightMap

    with pytest.raises(WeightMapError, match=re.escape(message)):
        WeightMap.from_dict({"rules": [{"sources": [pattern], "targets": ["y"]}]})


# ------------------------------------------------------------------------------ ops that grow past the file


def recorded(folder: Path, rule: str, source: dict | None = None, shape=(4, 4)) -> Path:
    """A 4x4 checkpoint that claims to have been converted by ``rule`` (and, if given, from ``source``)."""
    metadata = {"format": "pt", "splice.weightmap": json.dumps({"rules": [rule]})}
    if source is not None:
        metadata["splice.source_metadata"] = "null"
        metadata["splice.source_layout"] = json.dumps({"index_metadata": None, "files": [source]})
    save_state_dict({"w": torch.ones(shape)}, folder, metadata=metadata)
    return folder


@pytest.mark.parametrize("times", [2**16, 10**9])
@pytest.mark.parametrize("with_source", [False, True])
def test_a_recorded_op_that_would_allocate_far_more_than_the_file_is_refused(
    tmp_path, capsys, times, with_source
):
    rule = f"w -> w | dedup_blocks(times={times})"
    source = [["w", "F32", [4 * times, 4]]] if with_source else None
    src = recorded(tmp_path / "src", rule, source)
    assert main(["convert", str(src), str(tmp_path / "dst"), "--reverse"]) == 2
    err = capsys.readouterr().err
    made = {2**16: "4.2 MB", 10**9: "64.0 GB"}[times]
    assert (
        f"repeat_blocks(dim=0, blocks=1, times={times}) would make {made} out of the 64 B the step reads"
        in err
    )
    assert err.count("\n") == 1 and not (tmp_path / "dst").exists()


def test_an_intermediate_that_would_blow_up_is_refused_even_if_the_result_is_small(tmp_path):
    src = recorded(tmp_path / "src", "w -> w | repeat_blocks(times=65536) | dedup_blocks(times=65536)")
    with pytest.raises(Exception, match=r"repeat_blocks\(dim=0, blocks=1, times=65536\) would make 4.2 MB"):
        convert_checkpoint(src, tmp_path / "dst", None, reverse=True, progress=False)


@pytest.mark.parametrize(
    ("rule", "shape", "message"),
    [
        ("w -> w | pad(size=10000000000000000000)", (4, 4), "pad(dim=0, size=10000000000000000000"),
        ("w -> w | repeat_blocks(times=4611686018427387904)", (4, 4), "integer multiplication overflow"),
        ("w -> w.# | unstack", (10**6, 0), "would make 1000000 tensors, more than the 65536 allowed"),
    ],
)
def test_absurd_sizes_in_a_map_are_one_line_errors(tmp_path, capsys, rule, shape, message):
    save_state_dict({"w": torch.ones(shape)}, tmp_path / "src")
    (tmp_path / "map.json").write_text(json.dumps({"rules": [rule]}))
    assert (
        main(["convert", str(tmp_path / "src"), str(tmp_path / "dst"), "--map", str(tmp_path / "map.json")])
        == 2
    )
    err = capsys.readouterr().err
    assert err.startswith("splice convert: error: ") and message in err and err.count("\n") == 1


def test_consolidate_refuses_recorded_source_shapes_the_shards_do_not_make(tmp_path):
    shards = shards_dir(tmp_path / "shards")
    edit(shards, lambda d: d["source"]["tensors"].__setitem__("lm_head.weight", ["F32", [8 * 10**9, 4]]))
    with pytest.raises(
        CheckpointError,
        match=r"source.tensors records lm_head.weight as \[8000000000, 4\], but its weight_map makes \[8, 4\]",
    ):
        consolidate(shards, tmp_path / "out", progress=False)
    rules = {
        "format": "splice.weightmap",
        "version": 1,
        "rules": ["lm_head.weight -> lm_head.weight | dedup_blocks(times=1000000000)"],
    }
    edit(shards, lambda d: d.__setitem__("weight_map", rules))
    with pytest.raises(
        CheckpointError,
        match=r"repeat_blocks\(dim=0, blocks=1, times=1000000000\) would make 128.0 GB out of the 128 B",
    ):
        consolidate(shards, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------ text files that are not text


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR", "map.json: a weight map is UTF-8 JSON text, and this file is not (byte 0x89 at offset 0)"),
        (b"[" * 100_000, "map.json: weight map is not valid JSON: nested too deeply"),
    ],
    ids=["binary", "deep"],
)  # fmt: skip
def test_a_map_that_is_not_json_text_is_one_line_exit_2(tmp_path, capsys, content, message):
    save_state_dict(tensors(), tmp_path / "src")
    (tmp_path / "map.json").write_bytes(content)
    assert (
        main(["convert", str(tmp_path / "src"), str(tmp_path / "dst"), "--map", str(tmp_path / "map.json")])
        == 2
    )
    err = capsys.readouterr().err
    assert err.startswith("splice convert: error: ") and message in err and err.count("\n") == 1


def test_deep_json_in_splice_parallel_json_or_a_recorded_layout_is_a_clear_error(tmp_path, capsys):
    shards = shards_dir(tmp_path / "shards")
    (shards / METADATA_NAME).write_text("[" * 100_000)
    assert main(["consolidate", str(shards), str(tmp_path / "out")]) == 2
    assert "splice-parallel.json: unreadable: JSON nested too deeply" in capsys.readouterr().err
    src = recorded(tmp_path / "src", "w -> w | transpose")
    metadata = {"format": "pt", "splice.weightmap": "[" * 100_000}
    save_state_dict({"w": torch.ones(4, 4)}, src, metadata=metadata)
    assert main(["convert", str(src), str(tmp_path / "dst"), "--reverse"]) == 2
    assert (
        "the recorded splice.weightmap is unreadable: weight map is not valid JSON: nested too deeply"
        in capsys.readouterr().err
    )
    metadata = {"format": "pt", "splice.weightmap": "[]", "splice.source_layout": "[" * 100_000}
    save_state_dict({"w": torch.ones(4, 4)}, src, metadata=metadata)
    assert main(["convert", str(src), str(tmp_path / "dst"), "--reverse"]) == 2
    assert (
        "splice.source_layout / splice.source_metadata in its metadata are not what splice convert writes (RecursionError"
        in capsys.readouterr().err
    )


def test_from_pretrained_refuses_an_index_naming_a_file_outside(tmp_path, secret):
    transformers = pytest.importorskip("transformers")
    import splice

    config = transformers.LlamaConfig(
        hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, vocab_size=32,
    )  # fmt: skip
    transformers.LlamaForCausalLM(config).save_pretrained(tmp_path / "model", max_shard_size="8KB")
    index_path = tmp_path / "model" / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    index["weight_map"]["lm_head.weight"] = "../outside/shadow"
    index_path.write_text(json.dumps(index))
    with pytest.raises(CheckpointError) as info:
        splice.from_pretrained(transformers.LlamaForCausalLM, tmp_path / "model", fusion_config={"qkv": True})
    assert (
        "the shard file of tensor 'lm_head.weight' '../outside/shadow' is refused (a '..' component)"
        in str(info.value)
    )
    assert "root:" not in str(info.value)
