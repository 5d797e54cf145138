"""Which generated file a class belongs to, from the end of its name, and the ``__all__`` of each file."""

from __future__ import annotations

import re

import libcst as cst

# Longest suffix first: `ImageProcessorPil` must not stop at `Processor`.
SUFFIX_TO_FILE_TYPE = (
    ("ImageProcessorPil", "image_processing_pil"),
    ("ImageProcessorKwargs", "image_processing"),
    ("ImageProcessor", "image_processing"),
    ("VideoProcessorInitKwargs", "video_processing"),
    ("VideoProcessorKwargs", "video_processing"),
    ("VideoProcessor", "video_processing"),
    ("FeatureExtractor", "feature_extraction"),
    ("ProcessorKwargs", "processing"),
    ("ImagesKwargs", "processing"),
    ("VideosKwargs", "processing"),
    ("AudioKwargs", "processing"),
    ("TextKwargs", "processing"),
    ("Processor", "processing"),
    ("TokenizerFast", "tokenization"),
    ("Tokenizer", "tokenization"),
    ("Config", "configuration"),
)

# Order of the generated files in listings and in the output of a run.
FILE_TYPE_ORDER = (
    "configuration",
    "modeling",
    "tokenization",
    "processing",
    "image_processing",
    "image_processing_pil",
    "video_processing",
    "feature_extraction",
)


def file_type(class_name: str, cased_model_name: str = "") -> str:
    """``Olmo2Config`` -> ``configuration``; anything without a known suffix -> ``modeling``.

    The model's own name is taken off first, so ``Sam2VideoProcessor`` (model ``Sam2Video``) is a
    ``Processor``, not a ``VideoProcessor``.
    """
    name = class_name
    if cased_model_name and name.startswith(cased_model_name) and len(name) > len(cased_model_name):
        name = name[len(cased_model_name) :]
    for suffix, kind in SUFFIX_TO_FILE_TYPE:
        if name.endswith(suffix):
            return kind
    return "modeling"


def split_all(
    statement: cst.SimpleStatementLine, cased_model_name: str
) -> dict[str, cst.SimpleStatementLine]:
    """``__all__ = [...]`` split into one list per file type, each keeping the original order."""
    assign = statement.body[0]
    if not isinstance(assign, cst.Assign) or not isinstance(assign.value, (cst.List, cst.Tuple)):
        return {}
    per_type: dict[str, list[cst.Element]] = {}
    for element in assign.value.elements:
        if isinstance(element.value, cst.SimpleString):
            name = element.value.evaluated_value
            per_type.setdefault(file_type(name, cased_model_name), []).append(
                cst.Element(cst.SimpleString(element.value.value))
            )
    return {
        kind: statement.with_changes(body=[assign.with_changes(value=cst.List(elements))])
        for kind, elements in per_type.items()
    }


def output_name(kind: str, model_name: str) -> str:
    return f"{kind}_{model_name}.py"


MODULAR_NAME = re.compile(r"^modular_(?P<model>\w+)\.py$")
