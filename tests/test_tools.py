"""splice.tools: the overlap check, side-file carry-over (no link out of SRC is followed), the progress bar."""

from __future__ import annotations

import os

import pytest

from splice.errors import CheckpointError
from splice.tools import carry_side_files, progress_bar, refuse_overlap


@pytest.fixture
def src(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "model.safetensors").write_bytes(b"weights")
    (src / "model.safetensors.index.json").write_text("{}")
    (src / "pytorch_model.bin").write_bytes(b"old weights")
    (src / "config.json").write_text('{"a": 1}')
    (src / "tokenizer.json").write_text("tok")
    (src / ".hidden").write_text("not copied")
    return src


def test_side_files_are_copied_and_weights_and_skipped_names_are_not(src, tmp_path):
    staging = tmp_path / "staging"
    staging.mkdir()
    warnings: list[str] = []
    copied = carry_side_files(src, staging, warnings.append, skip={"tokenizer.json"}.__contains__)
    assert copied == ["config.json"] and warnings == []
    assert sorted(os.listdir(staging)) == ["config.json"]
    assert (staging / "config.json").read_bytes() == b'{"a": 1}'


def test_an_index_carries_its_folder_and_a_single_file_carries_nothing(src, tmp_path):
    for given, expected in [
        (src / "model.safetensors.index.json", ["config.json", "tokenizer.json"]),
        (src / "model.safetensors", []),
    ]:
        staging = tmp_path / f"staging-{given.name}"
        staging.mkdir()
        assert carry_side_files(given, staging, pytest.fail) == expected
        assert sorted(os.listdir(staging)) == expected


def test_a_link_out_of_src_is_not_followed_and_is_a_warning(src, tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("outside")
    (src / "notes.txt").symlink_to(secret)
    (src / "inside.txt").symlink_to(src / "config.json")
    staging = tmp_path / "staging"
    staging.mkdir()
    warnings: list[str] = []
    copied = carry_side_files(src, staging, warnings.append)
    assert copied == ["config.json", "inside.txt", "tokenizer.json"]
    assert not (staging / "notes.txt").exists()
    assert (staging / "inside.txt").read_text() == '{"a": 1}' and not (staging / "inside.txt").is_symlink()
    assert warnings == [
        f"{src / 'notes.txt'} is a symbolic link to {secret}, outside {src}; not copied (links out of the "
        "checkpoint directory are not followed; copy the file itself if it belongs there)"
    ]


def test_overlaps_are_refused_with_the_names_the_command_uses(src, tmp_path):
    cases = {
        src: f"refusing to write OUT_DIR {src}: it is SHARDS_DIR {src}",
        src / "out": f"refusing to write OUT_DIR {src / 'out'} inside SHARDS_DIR {src}",
        tmp_path: f"refusing to write OUT_DIR {tmp_path}: it contains SHARDS_DIR {src} and would replace it",
    }
    for dst, message in cases.items():
        with pytest.raises(CheckpointError) as info:
            refuse_overlap(src, dst, src_name="SHARDS_DIR", dst_name="OUT_DIR")
        assert str(info.value) == message
    refuse_overlap(src, tmp_path / "elsewhere")  # a new directory beside SRC is fine


def test_the_progress_bar_is_silent_off_a_terminal(capsys):
    with progress_bar(True, 100, "x") as advance:
        advance(50)
    assert capsys.readouterr() == ("", "")
