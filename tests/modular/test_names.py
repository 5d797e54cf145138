"""Model-name spelling, the rename regex and the suffix -> file table: pure functions."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from splice.modular.names import NameBook, NameSwap
from splice.modular.parents import prefix_of
from splice.modular.split import file_type

SWAP = NameSwap("llama", "olmo2", "Llama", "Olmo2")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("LlamaDecoderLayer", "Olmo2DecoderLayer"),
        ("llama_rope", "olmo2_rope"),
        ("LLAMA_INPUTS_DOCSTRING", "OLMO2_INPUTS_DOCSTRING"),
        ('"meta-llama/Llama-2-7b-hf"', '"meta-olmo2/Olmo2-2-7b-hf"'),
        ("# the LLaMA paper", "# the Olmo2 paper"),  # any other casing becomes the cased name
        ("xllama", "xllama"),  # glued to a preceding letter: another word
        ("llamapy", "olmo2py"),  # in text, renamed regardless
    ],
)
def test_swap_keeps_the_spelling(text, expected):
    assert SWAP(text) == expected


def test_swap_for_all_upper_cased_models_uses_the_next_character():
    swap = NameSwap("gptj", "tiny", "GPTJ", "Tiny")
    assert swap("GPTJModel") == "TinyModel"
    assert swap("GPTJ_START_DOCSTRING") == "TINY_START_DOCSTRING"


@given(st.from_regex(r"[a-km-z_][a-km-z0-9_]{0,20}", fullmatch=True))
def test_swap_leaves_text_without_the_old_name_alone(text):
    assert SWAP(text) == text


def test_name_book_uses_the_table_then_class_names_then_title_case():
    book = NameBook({"gpt_neox": "GPTNeoXConfig", "qwen2_vl": "Qwen2VLConfig"})
    assert book.cased("gpt_neox") == "GPTNeoX"
    assert book.snake("Qwen2VL") == "qwen2_vl"
    assert book.cased("my_model", {"MyMODELForCausalLM", "MyMODELConfig"}) == "MyMODEL"
    assert book.cased("my_model") == "MyModel"
    assert book.snake("Emu3Text") == "emu3_text"


@pytest.mark.parametrize(
    ("class_name", "model", "kind"),
    [
        ("Olmo2Config", "Olmo2", "configuration"),
        ("Olmo2TextConfig", "Olmo2", "configuration"),
        ("GemmaTokenizer", "Gemma", "tokenization"),
        ("LlavaProcessor", "Llava", "processing"),
        ("LlavaProcessorKwargs", "Llava", "processing"),
        ("LlavaImagesKwargs", "Llava", "processing"),
        ("LlavaImageProcessor", "Llava", "image_processing"),
        ("LlavaImageProcessorKwargs", "Llava", "image_processing"),
        ("LlavaImageProcessorPil", "Llava", "image_processing_pil"),
        ("LlavaVideoProcessor", "Llava", "video_processing"),
        ("Sam2VideoProcessor", "Sam2Video", "processing"),  # the model's own name is taken off first
        ("WhisperFeatureExtractor", "Whisper", "feature_extraction"),
        ("LlamaForCausalLM", "Llama", "modeling"),
    ],
)
def test_file_type_by_suffix(class_name, model, kind):
    assert file_type(class_name, model) == kind


@pytest.mark.parametrize(
    ("class_name", "base", "base_model", "expected"),
    [
        ("Emu3TextMLP", "LlamaMLP", "Llama", "Emu3Text"),
        ("RfDetrLayer", "DeformableDetrLayer", "DeformableDetr", "RfDetr"),
        ("Olmo2Model", "OlmoModel", "Olmo", "Olmo2"),
        ("Different", "LlamaMLP", "Llama", "Default"),
    ],
)
def test_prefix_of(class_name, base, base_model, expected):
    assert prefix_of(class_name, base, base_model, "Default") == expected


def test_identifiers_keep_a_snake_name_glued_to_more_letters():
    assert SWAP("use_llamapy", identifier=True) == "use_llamapy"
    assert SWAP("init_llama_weights", identifier=True) == "init_olmo2_weights"
    assert SWAP("LlamaModel", identifier=True) == "Olmo2Model"


def test_prefix_of_prefers_the_model_name_when_a_reading_gives_it():
    # `Ernie4_5_Moe` ends like `MoeStatics` begins: the common-suffix reading finds the model's name
    assert prefix_of("Ernie4_5_VLMoeMoeStatics", "Ernie4_5_MoeStatics", "Ernie4_5_Moe", "Ernie4_5_VLMoe") == (
        "Ernie4_5_VLMoe"
    )
