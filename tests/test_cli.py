"""The `splice` command: inspect, demo, and the error contract shared by every subcommand."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import tiny
import transformers as T

import splice
from splice.checkpoint import CheckpointReader
from splice.cli import main
from splice.transforms import bitwise_equal

SPLICE = str(Path(sys.executable).parent / "splice")


@pytest.fixture(scope="module")
def qwen2_vl_dir(tmp_path_factory):
    return tiny.save(tiny.qwen2_vl(), tmp_path_factory.mktemp("qwen2vl"))


def test_inspect_lists_each_family(qwen2_vl_dir, capsys):
    assert main(["inspect", str(qwen2_vl_dir)]) == 0
    out = capsys.readouterr().out
    for family, count, where in [
        ("qkv", 2, "model.language_model.layers.*.self_attn"),
        ("gate_up", 2, "model.language_model.layers.*.mlp"),
        ("patch_embeddings", 1, "model.visual.patch_embed"),
        ("qkv_split", 2, "model.visual.blocks.*.attn"),
    ]:
        row = next(line for line in out.splitlines() if line.startswith(f"│ {family} "))
        assert f"│ {count} " in row and where in row


def test_inspect_with_fusion_json(qwen2_vl_dir, capsys):
    assert main(["inspect", str(qwen2_vl_dir), "--fusion", '{"qkv": {"modules": "layers\\\\.0\\\\."}}']) == 0
    out = capsys.readouterr().out
    assert "│ qkv " in out and "│ 1 " in out and "gate_up" not in out


def test_saved_map_converts_to_what_a_runtime_save_writes(qwen2_vl_dir, tmp_path):
    fusion = "qkv,gate_up,patch_embeddings"
    assert (
        main(["inspect", str(qwen2_vl_dir), "--fusion", fusion, "--save-map", str(tmp_path / "map.json")])
        == 0
    )
    assert (
        main(
            [
                "convert",
                str(qwen2_vl_dir),
                str(tmp_path / "converted"),
                "--map",
                str(tmp_path / "map.json"),
                "--quiet",
            ]
        )
        == 0
    )
    model = splice.from_pretrained(
        T.Qwen2VLForConditionalGeneration, qwen2_vl_dir, fusion_config=fusion.split(",")
    )
    splice.save_pretrained(model, tmp_path / "runtime", save_original_format=False)
    converted = same_tensors(tmp_path / "converted", tmp_path / "runtime")
    assert "visual.patch_embed.linear_proj.weight" in converted


def same_tensors(a: Path, b: Path) -> CheckpointReader:
    """Assert two checkpoints hold the same keys with bitwise-equal tensors; the first one's reader."""
    first, second = CheckpointReader(a), CheckpointReader(b)
    assert sorted(first.keys()) == sorted(second.keys())
    for key in second.keys():
        assert bitwise_equal(first.get(key), second.get(key)), key
    return first


def test_saved_map_of_a_moe_model_leaves_the_per_expert_tensors_alone(tmp_path):
    """Stacking experts is transformers' own conversion, not a layout change on disk: not in the map."""
    path = tiny.save(tiny.causal_lm("mixtral"), tmp_path / "mixtral")
    assert main(["inspect", str(path), "--fusion", "qkv", "--save-map", str(tmp_path / "map.json")]) == 0
    wm = splice.WeightMap.load(tmp_path / "map.json")
    assert [str(p) for r in wm.rules for p in r.targets] == ["model.layers.*.self_attn.qkv_proj.weight"]
    args = ["--map", str(tmp_path / "map.json"), "--quiet"]
    assert main(["convert", str(path), str(tmp_path / "converted"), *args]) == 0
    model = splice.from_pretrained(T.AutoModelForCausalLM, path, fusion_config=["qkv"])
    splice.save_pretrained(model, tmp_path / "runtime", save_original_format=False)
    converted = same_tensors(tmp_path / "converted", tmp_path / "runtime")
    assert "model.layers.0.block_sparse_moe.experts.4.w3.weight" in converted
    assert main(["convert", str(tmp_path / "converted"), str(tmp_path / "back"), *args, "--reverse"]) == 0
    assert (tmp_path / "back" / "model.safetensors").read_bytes() == (path / "model.safetensors").read_bytes()


@pytest.mark.parametrize(
    "argv, message",
    [
        (["inspect", "{tmp}"], "no config.json"),
        (["inspect", "{model}", "--fusion", "{{bad json"], "--fusion is not valid JSON"),
        (["inspect", "{model}", "--fusion", "qkvv"], "unknown fusion family 'qkvv'"),
        (["inspect", "{model}", "--fusion", "qkv_split", "--save-map", "{tmp}/m.json"], ""),
    ],
)
def test_errors_are_one_line_with_exit_code_2(qwen2_vl_dir, tmp_path, argv, message):
    argv = [a.format(tmp=tmp_path, model=qwen2_vl_dir) for a in argv]
    result = subprocess.run([SPLICE, *argv], capture_output=True, text=True)
    if not message:
        assert result.returncode == 0, result.stderr
        return
    assert result.returncode == 2
    assert result.stderr.startswith(f"splice {argv[0]}: error: ") and message in result.stderr
    assert "Traceback" not in result.stderr


def test_demo_runs_end_to_end(tmp_path):
    result = subprocess.run(
        [SPLICE, "demo", "--workdir", str(tmp_path), "--repeat", "1", "--tokens", "4"],
        capture_output=True, text=True, timeout=600, env={"COLUMNS": "160", "PATH": str(Path(sys.executable).parent)},
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    for check in (
        "max |logits - transformers logits|",
        "20 greedy tokens identical",
        "saved files byte-identical",
    ):
        line = next(line for line in result.stdout.splitlines() if check in line)
        assert "yes" in line
    assert (tmp_path / "saved-original-layout" / "model.safetensors.index.json").is_file()


@pytest.mark.parametrize(
    "config, reason",
    [
        (
            "{nope",
            "not valid JSON: Expecting property name enclosed in double quotes: line 1 column 2 (char 1)",
        ),
        ("[1]", "must be a JSON object with a model_type, got a list"),
        ("{}", "Unrecognized model in {dir}. Should have a `model_type` key in its config.json."),
        (
            '{"model_type": "llama", "hidden_size": 63, "num_attention_heads": 4}',
            "The hidden size (63) is not a multiple of the number of attention heads (4).",
        ),
        (
            '{"model_type": "no_such_arch"}',
            "The checkpoint you are trying to load has model type `no_such_arch` but Transformers does not "
            "recognize this architecture.",
        ),
    ],
)
def test_inspect_names_a_bad_config_in_one_line(tmp_path, capsys, config, reason):
    (tmp_path / "config.json").write_text(config)
    assert main(["inspect", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    expected = f"splice inspect: error: {tmp_path / 'config.json'}: {reason.format(dir=tmp_path)}"
    if "no_such_arch" in config:  # transformers goes on with advice that changes between its versions
        assert err.startswith(expected) and err.count("\n") == 1
    else:
        assert err == expected + "\n"


def test_inspect_refuses_a_save_map_path_in_a_missing_directory(qwen2_vl_dir, tmp_path, capsys):
    out = tmp_path / "nonexistent_dir" / "m.json"
    assert main(["inspect", str(qwen2_vl_dir), "--save-map", str(out)]) == 2
    assert capsys.readouterr() == (
        "",
        f"splice inspect: error: --save-map {out}: directory {out.parent} does not exist\n",
    )


def test_demo_refuses_zero_repeats_and_a_file_as_workdir(tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        main(["demo", "--repeat", "0"])
    assert info.value.code == 2
    assert (
        capsys.readouterr().err.splitlines()[-1]
        == "splice demo: error: argument --repeat: must be an int >= 1, got '0'"
    )
    (tmp_path / "afile").write_text("keep")
    assert main(["demo", "--workdir", str(tmp_path / "afile")]) == 2
    assert capsys.readouterr().err == (
        f"splice demo: error: --workdir {tmp_path / 'afile'}: cannot use it as a directory: "
        "it exists and is not a directory\n"
    )
    assert (tmp_path / "afile").read_text() == "keep"
