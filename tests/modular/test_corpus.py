"""The converter against the modular files shipped in transformers, definition by definition.

By default a fixed sample of 32 files must come out identical (every top-level class, function and
assignment of every generated file, by AST). The full corpus (326 files) runs with
``pytest --runcorpus`` (or SPLICE_RUNCORPUS=1) and must match at least 98%.
"""

from __future__ import annotations

import importlib.metadata
from concurrent.futures import ProcessPoolExecutor

import pytest
from modular_corpus import compare, corpus_root, modular_files

EXPECTED_TRANSFORMERS = "5.23.0"

SAMPLE = [
    "afmoe/modular_afmoe.py",
    "aria/modular_aria.py",
    "audio_spectrogram_transformer/modular_audio_spectrogram_transformer.py",
    "chinese_clip/modular_chinese_clip.py",
    "cohere2/modular_cohere2.py",
    "cohere_asr/modular_cohere_asr.py",
    "dia/modular_dia.py",
    "edgetam_video/modular_edgetam_video.py",
    "gemma/modular_gemma.py",
    "gemma3/modular_gemma3.py",
    "gemma4_unified/modular_gemma4_unified.py",
    "glm4_moe/modular_glm4_moe.py",
    "glmasr/modular_glmasr.py",
    "hunyuan_v1_moe/modular_hunyuan_v1_moe.py",
    "kyutai_speech_to_text/modular_kyutai_speech_to_text.py",
    "llava_next_video/modular_llava_next_video.py",
    "longcat_flash/modular_longcat_flash.py",
    "metaclip_2/modular_metaclip_2.py",
    "minicpm3/modular_minicpm3.py",
    "mistral/modular_mistral.py",
    "olmo2/modular_olmo2.py",
    "olmoe/modular_olmoe.py",
    "parakeet/modular_parakeet.py",
    "pocket_tts/modular_pocket_tts.py",
    "pp_lcnet_v4/modular_pp_lcnet_v4.py",
    "pp_ocrv6_small_det/modular_pp_ocrv6_small_det.py",
    "qwen2_5_vl/modular_qwen2_5_vl.py",
    "qwen3_5_moe/modular_qwen3_5_moe.py",
    "sew/modular_sew.py",
    "switch_transformers/modular_switch_transformers.py",
    "ultrabert/modular_ultrabert.py",
    "vibevoice_asr/modular_vibevoice_asr.py",
]


def _root():
    try:
        version = importlib.metadata.version("transformers")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("transformers is not installed")
    if version != EXPECTED_TRANSFORMERS:
        pytest.skip(f"the corpus expectations are for transformers {EXPECTED_TRANSFORMERS}, found {version}")
    return corpus_root()


@pytest.fixture(scope="module")
def sample_reports():
    root = _root()
    with ProcessPoolExecutor(2) as pool:
        return dict(zip(SAMPLE, pool.map(compare, [root / name for name in SAMPLE]), strict=True))


@pytest.mark.parametrize("name", SAMPLE)
def test_sample_file_is_identical_to_the_shipped_one(sample_reports, name):
    report = sample_reports[name]
    assert report.error is None
    assert report.mismatches == []
    assert report.files_total >= 1 and report.identical == report.total


@pytest.mark.corpus
def test_full_corpus_matches_at_least_98_percent():
    root = _root()
    files = modular_files(root)
    assert len(files) == 326
    with ProcessPoolExecutor(2) as pool:
        reports = list(pool.map(compare, files, chunksize=4))
    identical = sum(r.identical for r in reports)
    total = sum(r.total for r in reports)
    files_identical = sum(r.files_identical for r in reports)
    files_total = sum(r.files_total for r in reports)
    print(f"\ndefinitions identical: {identical}/{total} = {100 * identical / total:.2f}%")
    print(f"generated files identical: {files_identical}/{files_total}")
    assert [r.modular for r in reports if r.error] == []
    assert identical / total >= 0.98
