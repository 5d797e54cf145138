"""splice convert: layout conversion of checkpoints on disk, exact reversal, errors that leave DST alone."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import safetensors
import safetensors.torch
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from splice.checkpoint import (
    CheckpointReader,
    CheckpointWriter,
    load_state_dict,
    plan_shards,
    save_state_dict,
)
from splice.cli import main
from splice.convert import MAP_KEY, SOURCE_LAYOUT_KEY, SOURCE_METADATA_KEY, convert_checkpoint
from splice.convert.jobs import replay_split
from splice.errors import CheckpointError, WeightMapError
from splice.transforms import TensorMeta, Transpose, bitwise_equal
from splice.weightmap import WeightMap

FUSE_RULES = [
    "model.layers.*.self_attn.{q,k,v}_proj.weight -> model.layers.*.self_attn.qkv_proj.weight | concat(dim=0)",
    "model.layers.*.mlp.{gate,up}_proj.weight -> model.layers.*.mlp.gate_up_proj.weight | concat(dim=0)",
]
FUSE = WeightMap.parse(FUSE_RULES)
QKV = "model.layers.{i}.self_attn.{p}_proj.weight"
FUSED_NAMES = ("self_attn.qkv_proj.weight", "mlp.gate_up_proj.weight")


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=128,
    )  # fmt: skip
    model = transformers.LlamaForCausalLM(config)
    root = tmp_path_factory.mktemp("llama")
    model.save_pretrained(root / "single")
    model.save_pretrained(root / "sharded", max_shard_size="110KB")
    assert len(list((root / "sharded").glob("model-*.safetensors"))) == 3
    (root / "fuse.json").write_text(json.dumps({"rules": FUSE_RULES}))
    return {k: v.detach().clone() for k, v in model.state_dict().items()}, root


def tree_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def leftovers(parent: Path) -> list[str]:
    return [p.name for p in parent.iterdir() if ".splice-tmp-" in p.name or ".splice-old-" in p.name]


def assert_same_tensors(a: dict, b: dict) -> None:
    assert set(a) == set(b)
    for key in a:
        assert bitwise_equal(a[key], b[key]), key


# ------------------------------------------------------------------------------------------ round trips


@pytest.mark.parametrize("form", ["single", "sharded"])
def test_convert_then_reverse_gives_back_the_same_files(llama, tmp_path, form):
    state_dict, root = llama
    src = root / form
    report = convert_checkpoint(src, tmp_path / "fused", FUSE, progress=False)

    fused = load_state_dict(tmp_path / "fused")
    for i in range(2):
        q, k, v = (state_dict[QKV.format(i=i, p=p)] for p in "qkv")
        assert bitwise_equal(fused[f"model.layers.{i}.self_attn.qkv_proj.weight"], torch.cat([q, k, v]))
        gate, up = (state_dict[f"model.layers.{i}.mlp.{p}_proj.weight"] for p in ("gate", "up"))
        assert bitwise_equal(fused[f"model.layers.{i}.mlp.gate_up_proj.weight"], torch.cat([gate, up]))
    unfused = {k for k in state_dict if not any(f".{p}_proj." in k for p in ("q", "k", "v", "gate", "up"))}
    fused_keys = {f"model.layers.{i}.{name}" for i in range(2) for name in FUSED_NAMES}
    assert set(fused) == unfused | fused_keys
    assert_same_tensors({k: fused[k] for k in unfused}, {k: state_dict[k] for k in unfused})

    nbytes = sum(t.nbytes for t in state_dict.values())
    assert (report.bytes_read, report.bytes_written, report.steps) == (nbytes, nbytes, len(unfused) + 4)
    assert set(report.unclaimed) == unfused and report.unused_rules == []
    assert report.files == ["model.safetensors"]
    assert (tmp_path / "fused" / "config.json").read_bytes() == (src / "config.json").read_bytes()
    with safetensors.safe_open(
        tmp_path / "fused" / "model.safetensors", "pt"
    ) as f:  # plain safetensors reads it
        metadata = f.metadata()
    assert metadata["format"] == "pt" and {MAP_KEY, SOURCE_METADATA_KEY, SOURCE_LAYOUT_KEY} <= set(metadata)

    recorded = convert_checkpoint(tmp_path / "fused", tmp_path / "back", None, reverse=True, progress=False)
    assert recorded.restored and recorded.warnings == []
    assert tree_bytes(tmp_path / "back") == tree_bytes(src)
    given_map = convert_checkpoint(tmp_path / "fused", tmp_path / "again", FUSE, reverse=True, progress=False)
    assert given_map.restored and tree_bytes(tmp_path / "again") == tree_bytes(src)
    assert leftovers(tmp_path) == []


def test_chained_conversions_reverse_one_at_a_time(llama, tmp_path):
    _, root = llama
    rename = WeightMap.parse(["model.** -> decoder.**"])
    convert_checkpoint(root / "sharded", tmp_path / "fused", FUSE, progress=False)
    convert_checkpoint(
        tmp_path / "fused", tmp_path / "renamed", rename, max_shard_size="100KB", progress=False
    )
    assert "decoder.layers.0.self_attn.qkv_proj.weight" in load_state_dict(tmp_path / "renamed")
    convert_checkpoint(tmp_path / "renamed", tmp_path / "fused2", None, reverse=True, progress=False)
    assert tree_bytes(tmp_path / "fused2") == tree_bytes(tmp_path / "fused")
    convert_checkpoint(tmp_path / "fused2", tmp_path / "back", None, reverse=True, progress=False)
    assert tree_bytes(tmp_path / "back") == tree_bytes(root / "sharded")


def test_max_shard_size_and_a_single_file_source(llama, tmp_path):
    state_dict, root = llama
    file = root / "single" / "model.safetensors"
    report = convert_checkpoint(file, tmp_path / "out", FUSE, max_shard_size="100KB", progress=False)
    assert report.files == [f"model-0000{i}-of-00004.safetensors" for i in range(1, 5)]
    written = sorted(p.name for p in (tmp_path / "out").iterdir())  # no config.json: SRC was a file
    assert written == [*report.files, "model.safetensors.index.json"]
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert index["metadata"] == {"total_size": sum(t.nbytes for t in state_dict.values())}
    convert_checkpoint(tmp_path / "out", tmp_path / "back", None, reverse=True, progress=False)
    assert tree_bytes(tmp_path / "back") == {"model.safetensors": file.read_bytes()}


GENERAL_RULES = [
    "a.*.{x,y} -> a.*.xy | concat(dim=1)",  # read into column views
    "b.# -> b_stacked | stack(dim=0)",  # read into unbind views
    "c -> c0, c1 | split(dim=0, sizes=(2, 3))",  # read by slice
    "d -> d.# | unstack(dim=0)",  # read by index
    "e -> e0, e1 | split(dim=1, sizes=(1, 3))",  # whole read, views
    "f -> f_t | transpose(0, 1)",
    "g.w -> g.conv | linear_to_conv(kernel=(2, 2))",
    "h.conv -> h.w | conv_to_linear",
    "i -> j",
]


def test_every_kind_of_step_matches_the_in_memory_map(tmp_path):
    g = torch.Generator().manual_seed(1)
    sd = {
        "a.0.x": torch.randn(3, 2, generator=g), "a.0.y": torch.randn(3, 5, generator=g),
        "a.1.x": torch.randn(4, 1, generator=g), "a.1.y": torch.randn(4, 2, generator=g),
        **{f"b.{i}": torch.randn(2, 3, generator=g).to(torch.bfloat16) for i in range(3)},
        "c": torch.randn(5, 4, generator=g), "d": torch.arange(12, dtype=torch.int64).reshape(3, 4),
        "e": torch.randn(2, 4, generator=g), "f": torch.randn(3, 5, generator=g),
        "g.w": torch.randn(6, 12, generator=g), "h.conv": torch.randn(4, 3, 2, 2, generator=g),
        "i": torch.tensor([True, False]), "untouched": torch.randn(7, generator=g),
        "scalar": torch.tensor(3.5, dtype=torch.float64), "empty": torch.empty(0, 4, dtype=torch.float16),
    }  # fmt: skip
    save_state_dict(sd, tmp_path / "src")
    wm = WeightMap.parse(GENERAL_RULES)
    convert_checkpoint(tmp_path / "src", tmp_path / "out", wm, progress=False)
    assert_same_tensors(load_state_dict(tmp_path / "out"), wm.to_runtime(sd))
    convert_checkpoint(tmp_path / "out", tmp_path / "back", wm, reverse=True, progress=False)
    assert tree_bytes(tmp_path / "back") == tree_bytes(tmp_path / "src")


# ------------------------------------------------------------------------------- reverse without a record


def test_reverse_of_an_unrecorded_checkpoint_needs_sizes(llama, tmp_path):
    state_dict, root = llama
    save_state_dict(FUSE.to_runtime(state_dict), tmp_path / "fused")  # fused by someone else: no record
    with pytest.raises(
        WeightMapError,
        match=r"cannot invert the map: rule .*concat\(dim=0\): cannot be inverted before its sizes are known.*; .*fused records no source shapes .* e.g. concat\(dim=0, sizes=",
    ) as e:
        convert_checkpoint(tmp_path / "fused", tmp_path / "out", FUSE, reverse=True, progress=False)
    assert "\n" not in str(e.value)
    with pytest.raises(
        WeightMapError, match=r"records no weight map \(splice.weightmap is not in its metadata"
    ):
        convert_checkpoint(tmp_path / "fused", tmp_path / "out", None, reverse=True, progress=False)
    assert not (tmp_path / "out").exists()

    sized = WeightMap.parse([
        FUSE_RULES[0].replace("concat(dim=0)", "concat(dim=0, sizes=(64, 32, 32))"),
        FUSE_RULES[1].replace("concat(dim=0)", "concat(dim=0, sizes=(96, 96))"),
    ])  # fmt: skip
    report = convert_checkpoint(tmp_path / "fused", tmp_path / "out", sized, reverse=True, progress=False)
    assert not report.restored
    assert_same_tensors(load_state_dict(tmp_path / "out"), state_dict)
    # an unrecorded reverse is recorded like any conversion, so it can be undone in turn
    convert_checkpoint(tmp_path / "out", tmp_path / "refused", None, reverse=True, progress=False)
    assert tree_bytes(tmp_path / "refused") == tree_bytes(tmp_path / "fused")


def test_reverse_with_a_map_that_does_not_match_the_record(llama, tmp_path):
    _, root = llama
    convert_checkpoint(root / "single", tmp_path / "fused", FUSE, progress=False)
    with pytest.raises(WeightMapError, match=r"does not undo the conversion recorded in .*it does not produce model.layers.0.mlp.gate_proj.weight"):  # fmt: skip
        convert_checkpoint(tmp_path / "fused", tmp_path / "out", WeightMap.parse(FUSE_RULES[:1]), reverse=True, progress=False)  # fmt: skip
    wrong_dim = WeightMap.parse([FUSE_RULES[0].replace("dim=0", "dim=1"), FUSE_RULES[1]])
    with pytest.raises(WeightMapError, match=r"does not fit the checkpoint .* was converted from: rule .* on model.layers.0.self_attn.{q,k,v}_proj.weight: concat\(dim=1, .*\): inputs must agree on every dim except 1"):  # fmt: skip
        convert_checkpoint(tmp_path / "fused", tmp_path / "out", wrong_dim, reverse=True, progress=False)
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


def test_a_split_that_no_size_limit_gives_is_written_at_the_default(tmp_path):
    sd = {name: torch.full((n,), float(n)) for name, n in (("a", 10), ("b", 10), ("c", 30))}
    (tmp_path / "src").mkdir()
    files = {"model-00001-of-00002.safetensors": ["a"], "model-00002-of-00002.safetensors": ["b", "c"]}
    for name, keys in files.items():  # [a] | [b, c]: a greedy split would have put b beside a
        safetensors.torch.save_file({k: sd[k] for k in keys}, tmp_path / "src" / name)
    index = {"metadata": {}, "weight_map": {k: name for name, keys in files.items() for k in keys}}
    (tmp_path / "src" / "model.safetensors.index.json").write_text(json.dumps(index))

    convert_checkpoint(tmp_path / "src", tmp_path / "fused", WeightMap.parse(["a -> z"]), progress=False)
    report = convert_checkpoint(tmp_path / "fused", tmp_path / "back", None, reverse=True, progress=False)
    assert report.restored and report.files == ["model.safetensors"]
    assert report.warnings == [
        "the source's split into 2 file(s) cannot be reproduced by a size limit; sharding at 5GB instead "
        "(the tensors are the source's, bit for bit)"
    ]
    assert_same_tensors(load_state_dict(tmp_path / "back"), sd)
    chosen = convert_checkpoint(tmp_path / "fused", tmp_path / "set", None, reverse=True, max_shard_size=50, progress=False)  # fmt: skip
    assert chosen.warnings == [] and len(chosen.files) == 3  # the caller's split, without a warning


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, 40), min_size=1, max_size=12), st.integers(1, 50), st.randoms())
def test_any_greedy_split_is_replayed_from_its_files(sizes, limit, random):
    metas = {f"t{i}": TensorMeta((n,), torch.uint8) for i, n in enumerate(sizes)}
    files = plan_shards(metas, limit)
    for file in files:
        random.shuffle(file)  # the record keeps files, not the order the tensors were saved in
    ordered, found_limit = replay_split(files, metas)
    assert [set(s) for s in plan_shards(ordered, found_limit)] == [set(f) for f in files]


# ------------------------------------------------------------------------------------ the command line


def cli(*args: object) -> int:
    return main(["convert", *map(str, args)])


def test_cli_round_trip_and_messages(llama, tmp_path, capsys):
    _, root = llama
    assert cli(root / "sharded", tmp_path / "fused", "--map", root / "fuse.json") == 0
    out, err = capsys.readouterr()
    assert out.startswith(f"wrote {tmp_path / 'fused'}: 1 file(s), 15 steps, 312.6 kB in ") and err == ""
    assert cli(tmp_path / "fused", tmp_path / "back", "--reverse") == 0
    out, err = capsys.readouterr()
    assert out.startswith(f"wrote {tmp_path / 'back'}: 3 file(s), 15 steps") and err == ""
    assert out.endswith("s, restored the recorded source\n")
    assert tree_bytes(tmp_path / "back") == tree_bytes(root / "sharded")

    assert cli(root / "single", tmp_path / "x") == 2
    assert capsys.readouterr().err == (
        "splice convert: error: --map MAP.json is required (only --reverse can use the map recorded in SRC)\n"
    )


def test_unused_rules_warn_and_strict_refuses(llama, tmp_path, capsys):
    _, root = llama
    (tmp_path / "map.json").write_text(
        json.dumps([*FUSE_RULES, "model.layers.*.mlp.experts.# -> x.* | stack"])
    )
    assert cli(root / "single", tmp_path / "out", "--map", tmp_path / "map.json") == 0
    assert capsys.readouterr().err == (
        "splice convert: warning: 1 rule(s) matched no key: model.layers.*.mlp.experts.# -> x.* | stack(dim=0)\n"
    )
    assert cli(root / "single", tmp_path / "strict", "--map", tmp_path / "map.json", "--strict") == 2
    err = capsys.readouterr().err
    assert err.startswith(
        "splice convert: error: strict: 1 rule(s) matched no key: model.layers.*.mlp.experts.#"
    )
    assert (
        "; 11 key(s) no rule claims: lm_head.weight, model.embed_tokens.weight, " in err
        and err.count("\n") == 1
    )
    assert not (tmp_path / "strict").exists() and leftovers(tmp_path) == []


def test_the_console_script(llama, tmp_path):
    _, root = llama
    splice = Path(sys.executable).parent / "splice"
    done = subprocess.run(
        [splice, "convert", root / "single", tmp_path / "fused", "--map", root / "fuse.json"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"wrote {tmp_path / 'fused'}: 1 file(s)") and done.stderr == ""
    done = subprocess.run(
        [splice, "convert", tmp_path / "fused", tmp_path / "fused", "--reverse"],
        capture_output=True,
        text=True,
    )
    assert (done.returncode, done.stdout) == (2, "")
    assert done.stderr == f"splice convert: error: refusing to write DST {tmp_path / 'fused'}: it is SRC {tmp_path / 'fused'}\n"  # fmt: skip


def test_progress_bar_draws_on_a_terminal(llama, tmp_path, monkeypatch, capsys):
    _, root = llama
    monkeypatch.setenv("TTY_COMPATIBLE", "1")
    convert_checkpoint(root / "single", tmp_path / "out", FUSE, progress=True)
    err = capsys.readouterr().err
    assert "single -> out" in err and "kB" in err
    convert_checkpoint(root / "single", tmp_path / "out", FUSE, progress=False)
    assert capsys.readouterr().err == ""


# ---------------------------------------------------------------------------------- errors leave DST alone


def _broken_checkpoint(kind: str, state_dict: dict, folder: Path) -> Path:
    sd = dict(state_dict)
    if kind == "missing key":
        del sd["model.layers.1.self_attn.v_proj.weight"]
    elif kind == "shape mismatch":
        sd["model.layers.0.self_attn.k_proj.weight"] = torch.zeros(32, 63)
    save_state_dict(sd, folder)
    file = folder / "model.safetensors"
    data = file.read_bytes()
    if kind == "truncated header":
        file.write_bytes(data[:100])
    elif kind == "wrong dtype tag":
        file.write_bytes(data.replace(b'"dtype":"F32"', b'"dtype":"F31"', 1))
    return folder


ERRORS = {
    "missing key": "rule model.layers.*.self_attn.{q,k,v}_proj.weight -> model.layers.*.self_attn.qkv_proj.weight"
    " | concat(dim=0): found model.layers.1.self_attn.q_proj.weight, model.layers.1.self_attn.k_proj.weight"
    " but not model.layers.1.self_attn.v_proj.weight",
    "shape mismatch": "on model.layers.0.self_attn.{q,k,v}_proj.weight: concat(dim=0, sizes=(64, 32, 32)): inputs"
    " must agree on every dim except 0; got shapes [64, 64], [32, 63], [32, 64]",
    "truncated header": "model.safetensors: truncated or not safetensors: its header length is more than the ",
    "wrong dtype tag": "model.safetensors: tensor 'lm_head.weight' has dtype tag 'F31', expected one of F64,",
}


@pytest.mark.parametrize("kind", ERRORS)
@pytest.mark.parametrize("dst_exists", [False, True])
def test_bad_checkpoints_fail_without_touching_dst(llama, tmp_path, capsys, kind, dst_exists):
    state_dict, root = llama
    src = _broken_checkpoint(kind, state_dict, tmp_path / "src")
    dst = tmp_path / "dst"
    if dst_exists:
        save_state_dict({"old": torch.ones(3)}, dst)
    before = tree_bytes(dst) if dst_exists else None
    assert cli(src, dst, "--map", root / "fuse.json") == 2
    err = capsys.readouterr().err
    assert err.startswith("splice convert: error: ") and ERRORS[kind] in err and err.count("\n") == 1
    assert (tree_bytes(dst) if dst.exists() else None) == before
    assert leftovers(tmp_path) == []


def test_dst_must_not_overlap_src(llama, tmp_path, capsys):
    state_dict, root = llama
    src = tmp_path / "src"
    save_state_dict(state_dict, src)
    before = tree_bytes(src)
    (tmp_path / "link").symlink_to(src)
    cases = {
        src: f"refusing to write DST {src}: it is SRC {src}",
        tmp_path / "link": f"refusing to write DST {tmp_path / 'link'}: it is SRC {src}",
        src / "sub": f"refusing to write DST {src / 'sub'} inside SRC {src}",
        tmp_path: f"refusing to write DST {tmp_path}: it contains SRC {src} and would replace it",
    }
    for dst, message in cases.items():
        assert cli(src, dst, "--map", root / "fuse.json") == 2
        assert capsys.readouterr().err == f"splice convert: error: {message}\n"
    file_src = src / "model.safetensors"
    assert cli(file_src, src, "--map", root / "fuse.json") == 2
    assert "it contains SRC" in capsys.readouterr().err
    assert tree_bytes(src) == before and not (src / "sub").exists() and leftovers(tmp_path) == []


def test_dst_must_be_new_or_a_checkpoint(llama, tmp_path, capsys):
    _, root = llama
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("keep me")
    (tmp_path / "file").write_text("")
    assert cli(root / "single", tmp_path / "notes", "--map", root / "fuse.json") == 2
    assert capsys.readouterr().err == (
        f"splice convert: error: refusing to replace DST {tmp_path / 'notes'}: it is a directory that holds "
        "files but no safetensors checkpoint; remove it or choose a new one\n"
    )
    assert cli(root / "single", tmp_path / "file", "--map", root / "fuse.json") == 2
    assert capsys.readouterr().err.endswith(f"DST {tmp_path / 'file'} exists and is not a directory\n")
    assert (tmp_path / "notes" / "todo.txt").read_text() == "keep me"
    (tmp_path / "empty").mkdir()  # an empty directory, or an older checkpoint, is replaced
    assert cli(root / "single", tmp_path / "empty", "--map", root / "fuse.json", "--quiet") == 0
    assert cli(root / "sharded", tmp_path / "empty", "--map", root / "fuse.json", "--quiet") == 0


def test_the_weights_file_keeps_its_name(llama, tmp_path):
    state_dict, _ = llama
    save_state_dict(
        state_dict, tmp_path / "adapter", weights_name="adapter_model.safetensors", max_shard_size="100KB"
    )
    save_state_dict(state_dict, tmp_path / "single", weights_name="adapter_model.safetensors")
    for form in ("adapter/adapter_model.safetensors.index.json", "single/adapter_model.safetensors"):
        report = convert_checkpoint(
            tmp_path / form, tmp_path / "fused", FUSE, max_shard_size="200KB", progress=False
        )
        assert report.files == [
            "adapter_model-00001-of-00002.safetensors",
            "adapter_model-00002-of-00002.safetensors",
        ]
        convert_checkpoint(tmp_path / "fused" / "adapter_model.safetensors.index.json", tmp_path / "back", None, reverse=True, progress=False)  # fmt: skip
        assert tree_bytes(tmp_path / "back") == tree_bytes((tmp_path / form).parent)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("{not json", "map.json: weight map is not valid JSON: Expecting property name"),
        ('["a -> b | concatt(dim=0)"]', "map.json: rule 'a -> b | concatt(dim=0)': unknown op 'concatt' in"),
        ('[{"sources": ["a"], "targets": ["b"], "ops": [{"op": "nope"}]}]', "unknown op 'nope'; known ops: "),
        ('{"rules": ["a -> b"], "format": "other"}', "not a splice.weightmap version 1 document"),
        ('{"stages": [5]}', "map.json: stage 1: a stage is a dict with only 'rules', got 5\n"),
        (
            '["a -> b", {"sources": ["c"], "targets": ["d"], "ops": [{"op": "concat", "dim": 1.5}]}]',
            "map.json: rule 2: op concat: field dim must be an int, got 1.5\n",
        ),
        (
            '[{"sources": "x", "targets": ["y"]}]',
            "map.json: rule 1: field sources must be a list of strings, got 'x'\n",
        ),
    ],
)
def test_bad_maps_are_clear_errors(llama, tmp_path, capsys, text, message):
    _, root = llama
    (tmp_path / "map.json").write_text(text)
    assert cli(root / "single", tmp_path / "out", "--map", tmp_path / "map.json") == 2
    err = capsys.readouterr().err
    assert err.startswith("splice convert: error: ") and message in err and err.count("\n") == 1
    assert not (tmp_path / "out").exists()
    assert cli(root / "single", tmp_path / "out", "--map", tmp_path / "missing.json") == 2
    assert "cannot read weight map" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------- atomicity


def test_a_failure_mid_conversion_leaves_dst_unchanged(llama, tmp_path, monkeypatch):
    _, root = llama
    save_state_dict({"old": torch.ones(3)}, tmp_path / "dst")
    before = tree_bytes(tmp_path / "dst")
    writes = []
    original = CheckpointWriter.write

    def failing_write(self, key, tensor):
        if len(writes) == 5:
            raise RuntimeError("disk on fire")
        writes.append(key)
        original(self, key, tensor)

    monkeypatch.setattr(CheckpointWriter, "write", failing_write)
    with pytest.raises(RuntimeError, match="disk on fire"):
        convert_checkpoint(root / "sharded", tmp_path / "dst", FUSE, progress=False)
    assert tree_bytes(tmp_path / "dst") == before and leftovers(tmp_path) == []
    monkeypatch.undo()

    real_apply = Transpose.apply

    def failing_op(self, tensors):
        if tensors[0].is_meta:  # planning infers shapes on meta tensors: fail only once data flows
            return real_apply(self, tensors)
        raise RuntimeError("op failed")

    monkeypatch.setattr(Transpose, "apply", failing_op)
    with pytest.raises(RuntimeError, match="op failed"):
        convert_checkpoint(root / "single", tmp_path / "new", WeightMap.parse(["lm_head.weight -> lm_head.t | transpose"]), progress=False)  # fmt: skip
    assert not (tmp_path / "new").exists() and leftovers(tmp_path) == []


def test_sigterm_mid_conversion_unwinds_like_ctrl_c(llama, tmp_path, monkeypatch, capsys):
    """``timeout`` and schedulers send SIGTERM: the staging directory goes, and DST stays as it was."""
    _, root = llama
    save_state_dict({"old": torch.ones(3)}, tmp_path / "dst")
    before = tree_bytes(tmp_path / "dst")
    FUSE.save(tmp_path / "map.json")
    original, writes = CheckpointWriter.write, []

    def terminated_write(self, key, tensor):
        writes.append(key)
        if len(writes) == 5:
            os.kill(os.getpid(), signal.SIGTERM)  # handled at the next bytecode, inside the conversion
        original(self, key, tensor)

    monkeypatch.setattr(CheckpointWriter, "write", terminated_write)
    reached = []  # without splice's own handler the signal lands here, not in the test runner's death

    def catcher(*_):
        reached.append(True)

    previous = signal.signal(signal.SIGTERM, catcher)
    try:
        argv = ["convert", str(root / "sharded"), str(tmp_path / "dst"), "--map", str(tmp_path / "map.json"), "--quiet"]  # fmt: skip
        assert main(argv) == 128 + signal.SIGTERM
        assert signal.getsignal(signal.SIGTERM) is catcher  # main put back the handler it found
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert reached == []
    assert "splice convert: terminated" in capsys.readouterr().err
    assert tree_bytes(tmp_path / "dst") == before and leftovers(tmp_path) == []


def test_a_corrupt_record_is_a_clear_error(llama, tmp_path):
    state_dict, _ = llama
    sd = {"x": torch.ones(2)}
    metas = {"x": TensorMeta.of(sd["x"])}
    with CheckpointWriter(tmp_path / "fused", metas, metadata={SOURCE_LAYOUT_KEY: "[1, 2"}) as w:
        w.write("x", sd["x"])
    with pytest.raises(CheckpointError, match=r"fused: splice.source_layout / splice.source_metadata in its metadata are not what splice convert writes \(JSONDecodeError"):  # fmt: skip
        convert_checkpoint(tmp_path / "fused", tmp_path / "out", None, reverse=True, progress=False)
    with CheckpointReader(tmp_path / "fused") as reader:
        assert reader.metadata == {SOURCE_LAYOUT_KEY: "[1, 2"}


def test_a_mistyped_recorded_map_or_layout_is_a_clear_error(llama, tmp_path, capsys):
    _, root = llama
    assert cli(root / "single", tmp_path / "fused", "--map", root / "fuse.json", "--quiet") == 0
    with CheckpointReader(tmp_path / "fused") as reader:
        tensors = {k: reader.get(k) for k in reader.keys()}
        recorded = dict(reader.metadata)
    metadata = {**recorded, MAP_KEY: recorded[MAP_KEY].replace('"dim": 0', '"dim": "0"', 1)}
    save_state_dict(tensors, tmp_path / "tampered", metadata=metadata)
    assert cli(tmp_path / "tampered", tmp_path / "back", "--reverse") == 2
    assert capsys.readouterr().err == (
        f"splice convert: error: {tmp_path / 'tampered'}: the recorded {MAP_KEY} is unreadable: "
        "rule 1: op concat: field dim must be an int, got '0'\n"
    )
    assert not (tmp_path / "back").exists()

    layout = {**json.loads(recorded[SOURCE_LAYOUT_KEY]), "index_metadata": [1]}
    metadata = {**recorded, SOURCE_LAYOUT_KEY: json.dumps(layout)}
    save_state_dict(tensors, tmp_path / "tampered", metadata=metadata)
    assert cli(tmp_path / "tampered", tmp_path / "back", "--reverse") == 2
    assert capsys.readouterr().err == (
        f"splice convert: error: {tmp_path / 'tampered'}: {SOURCE_LAYOUT_KEY} / {SOURCE_METADATA_KEY} in its "
        "metadata are not what splice convert writes (TypeError: its index_metadata is a list)\n"
    )
