"""File splitting by class-name suffix, cross-file imports, ``__all__``, import pruning and the header."""

from __future__ import annotations

from modular_helpers import code, definitions, imports

from splice.modular import convert_file

CONFIG = """
from ...configuration_utils import PreTrainedConfig


class BaseConfig(PreTrainedConfig):
    model_type = "base"
    hidden_size: int = 8
    vocab_size: int = 100

    def __post_init__(self, **kwargs):
        self.head_dim = self.hidden_size // 2
        super().__post_init__(**kwargs)
"""

MODELING = """
import math

import torch
from torch import nn

from ...utils import is_torch_available
from .configuration_base import BaseConfig

if is_torch_available():
    import torch.distributed as dist
    from ...integrations import fast_kernel


class BaseLayer(nn.Module):
    def __init__(self, config: BaseConfig):
        super().__init__()
        self.proj = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(self, x):
        if dist.is_initialized():
            return fast_kernel(x)
        return self.proj(x)
"""

PROCESSING = """
from ...processing_utils import ProcessingKwargs, ProcessorMixin


class BaseProcessorKwargs(ProcessingKwargs, total=False):
    _defaults = {"text_kwargs": {"padding": False}}


class BaseProcessor(ProcessorMixin):
    valid_kwargs = BaseProcessorKwargs

    def __call__(self, text=None, **kwargs):
        return self.tokenizer(text, **kwargs)
"""

MODULAR = """
# Copyright 2026 The Child authors.
#
# Licensed under the Apache License, Version 2.0.
import math

import torch
from torch import nn

from ..base.configuration_base import BaseConfig
from ..base.modeling_base import BaseLayer
from ..base.processing_base import BaseProcessor, BaseProcessorKwargs


class ChildConfig(BaseConfig):
    model_type = "child"
    hidden_size: int = 16


class ChildProcessorKwargs(BaseProcessorKwargs, total=False):
    _defaults = {"text_kwargs": {"padding": True}}


class ChildProcessor(BaseProcessor):
    pass


class ChildLayer(BaseLayer):
    def forward(self, x):
        x = x / math.sqrt(x.shape[-1])
        return super().forward(x)


__all__ = ["ChildConfig", "ChildLayer", "ChildProcessor"]
"""


def convert(package):
    root = package(
        {
            "models/base/configuration_base.py": CONFIG,
            "models/base/modeling_base.py": MODELING,
            "models/base/processing_base.py": PROCESSING,
            "models/child/modular_child.py": MODULAR,
        }
    )
    return convert_file(root / "models/child/modular_child.py")


def test_classes_are_split_by_suffix_with_all_split_too(package):
    out = convert(package)
    assert sorted(out) == ["configuration_child.py", "modeling_child.py", "processing_child.py"]
    assert list(definitions(out["configuration_child.py"])) == ["ChildConfig", "__all__"]
    assert list(definitions(out["processing_child.py"])) == [
        "ChildProcessorKwargs",
        "ChildProcessor",
        "__all__",
    ]
    assert list(definitions(out["modeling_child.py"])) == ["ChildLayer", "__all__"]
    assert definitions(out["configuration_child.py"])["__all__"] == code('__all__ = ["ChildConfig"]')
    assert definitions(out["processing_child.py"])["__all__"] == code('__all__ = ["ChildProcessor"]')
    assert definitions(out["modeling_child.py"])["__all__"] == code('__all__ = ["ChildLayer"]')


def test_config_keeps_parent_fields_with_modular_values(package):
    config = definitions(convert(package)["configuration_child.py"])["ChildConfig"]
    assert config == code("""
        class ChildConfig(PreTrainedConfig):
            model_type = "child"
            hidden_size: int = 16
            vocab_size: int = 100

            def __post_init__(self, **kwargs):
                self.head_dim = self.hidden_size // 2
                super().__post_init__(**kwargs)
    """)


def test_cross_file_reference_becomes_an_import(package):
    out = convert(package)
    assert "from .configuration_child import ChildConfig" in imports(out["modeling_child.py"])
    processing = definitions(out["processing_child.py"])["ChildProcessor"]
    assert "valid_kwargs = ChildProcessorKwargs" in processing


def test_imports_are_pruned_deduplicated_and_guards_kept(package):
    modeling = convert(package)["modeling_child.py"]
    found = imports(modeling)
    # `math` is imported by both the modular file and the parent: once; `is_torch_available` guards the block
    assert found.count("import math") == 1
    assert "from ...configuration_utils import PreTrainedConfig" not in found
    assert "from ..base.modeling_base import BaseLayer" not in found
    guarded = modeling[modeling.index("if is_torch_available():") :]
    assert (
        "import torch.distributed as dist" in guarded and "from ...integrations import fast_kernel" in guarded
    )
    assert code(modeling).count("import torch.distributed as dist") == 1


def test_super_call_inside_an_expression_is_kept_and_noted(package, caplog):
    root = package(
        {
            "models/base/modeling_base.py": MODELING,
            "models/child/modular_child.py": """
            from ..base.modeling_base import BaseLayer


            class ChildLayer(BaseLayer):
                def forward(self, x):
                    return super().forward(x) * 2
        """,
        }
    )
    with caplog.at_level("DEBUG", logger="splice.modular"):
        out = convert_file(root / "models/child/modular_child.py")
    assert "return super().forward(x) * 2" in definitions(out["modeling_child.py"])["ChildLayer"]
    assert "modular_child.py:6: super().forward(...) is not a statement of its own" in caplog.text


def test_header_names_the_modular_file_and_keeps_its_license(package):
    out = convert(package)
    for text in out.values():
        head = text.splitlines()[:12]
        assert (
            "#           This file was automatically generated from mypkg/models/child/modular_child.py."
            in head
        )
        assert "# Copyright 2026 The Child authors." in head
        assert "# Licensed under the Apache License, Version 2.0." in head


def test_output_is_deterministic(package):
    assert convert(package) == convert(package)
