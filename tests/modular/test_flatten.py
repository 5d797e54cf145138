"""Inheritance flattening, dependency tracking, renaming, super() unrolling and removal."""

from __future__ import annotations

import logging

import pytest
from modular_helpers import code, definitions, imports, methods

from splice.modular import ModularError, convert_file

BASE = '''
# Copyright the Base authors.
import torch
from torch import nn

from ...utils import auto_docstring, traced
from .configuration_base import BaseConfig

BASE_SCALE = 2
BASE_INPUTS_DOCSTRING = "Inputs of the Base model."


def base_helper(x):
    """Scales like Base does."""
    return x * BASE_SCALE


class BaseMLP(nn.Module):
    def __init__(self, config: BaseConfig):
        super().__init__()
        self.up = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(self, x):
        return base_helper(self.up(x))


class BaseAttention(nn.Module):
    """Attention of the Base model (see BASE_INPUTS_DOCSTRING)."""

    is_causal = True
    scale: float = 1.0

    def __init__(self, config: BaseConfig, layer_idx: int = 0):
        super().__init__()
        self.config = config
        self.q_proj = nn.Linear(config.hidden_size, config.hidden_size)
        self.dropout = nn.Dropout(0.1)
        self.norm = nn.LayerNorm(config.hidden_size)

    @traced
    def forward(self, hidden_states: torch.Tensor, mask=None, scale: float = 1.0) -> torch.Tensor:
        """Runs Base attention."""
        # base-style attention
        return self.dropout(self.q_proj(hidden_states)) * scale

    def describe(self):
        return "base attention"

    def reset(self):
        return None


@auto_docstring
class BaseModel(nn.Module):
    def __init__(self, config: BaseConfig):
        super().__init__()
        self.attn = BaseAttention(config)
        self.mlp = BaseMLP(config)
        self.post_init()

    @add_start_docstrings(BASE_INPUTS_DOCSTRING)
    def forward(self, x):
        return self.mlp(self.attn(x))
'''


@pytest.fixture
def tree(package):
    def build(modular: str, extra: dict[str, str] | None = None):
        files = {"models/base/modeling_base.py": BASE, "models/child/modular_child.py": modular}
        files.update(extra or {})
        root = package(files)
        return convert_file(root / "models/child/modular_child.py")

    return build


def test_class_is_flattened_with_merged_attributes_and_methods(tree):
    out = tree("""
        from ..base.modeling_base import BaseAttention

        class ChildAttention(BaseAttention):
            scale: float = 0.5
            window = 4

            def describe(self):
                return "child attention"

            def extra(self):
                return 1
    """)
    assert set(out) == {"modeling_child.py"}
    assert definitions(out["modeling_child.py"])["ChildAttention"] == code('''
        class ChildAttention(nn.Module):
            """Attention of the Child model (see CHILD_INPUTS_DOCSTRING)."""
            is_causal = True
            scale: float = 0.5
            window = 4

            def __init__(self, config: ChildConfig, layer_idx: int = 0):
                super().__init__()
                self.config = config
                self.q_proj = nn.Linear(config.hidden_size, config.hidden_size)
                self.dropout = nn.Dropout(0.1)
                self.norm = nn.LayerNorm(config.hidden_size)

            @traced
            def forward(self, hidden_states: torch.Tensor, mask=None, scale: float = 1.0) -> torch.Tensor:
                """Runs Child attention."""
                return self.dropout(self.q_proj(hidden_states)) * scale

            def describe(self):
                return "child attention"

            def reset(self):
                return None

            def extra(self):
                return 1
    ''')


def test_dependencies_are_pulled_renamed_and_ordered_before_their_users(tree):
    out = tree("""
        from ..base.modeling_base import BaseModel

        class ChildModel(BaseModel):
            pass
    """)
    generated = out["modeling_child.py"]
    found = definitions(generated)
    # Nothing but ChildModel was asked for: the rest comes from what BaseModel uses, renamed.
    # Each dependency comes right before its first user, in the parent's order.
    assert list(found) == [
        "CHILD_INPUTS_DOCSTRING",
        "CHILD_SCALE",
        "base_helper",
        "ChildMLP",
        "ChildAttention",
        "ChildModel",
    ]
    # Shared helper functions keep their names; their bodies are renamed like the rest.
    assert found["base_helper"] == code('''
        def base_helper(x):
            """Scales like Child does."""
            return x * CHILD_SCALE
    ''')
    assert found["ChildModel"].startswith("@auto_docstring\nclass ChildModel(nn.Module):")
    assert "self.attn = ChildAttention(config)" in found["ChildModel"]
    assert "from .configuration_child import ChildConfig" in imports(generated)
    assert "# base-style attention" not in generated and "# child-style attention" in generated


def test_absolute_imports_keep_their_names(package):
    root = package(
        {
            "models/base/modeling_base.py": """
            from torch import nn
            from othertool.base_layers import BaseLayerNorm

            class BaseBlock(nn.Module):
                def __init__(self):
                    super().__init__()
                    self.norm = BaseLayerNorm(4)
        """,
            "models/child/modular_child.py": """
            from ..base.modeling_base import BaseBlock

            class ChildBlock(BaseBlock):
                pass
        """,
        }
    )
    generated = convert_file(root / "models/child/modular_child.py")["modeling_child.py"]
    assert "self.norm = BaseLayerNorm(4)" in definitions(generated)["ChildBlock"]
    assert "from othertool.base_layers import BaseLayerNorm" in imports(generated)


def test_super_init_unrolled_with_reassignment_and_del(tree):
    out = tree("""
        from torch import nn
        from ..base.modeling_base import BaseAttention

        class ChildAttention(BaseAttention):
            def __init__(self, config, layer_idx: int = 0):
                super().__init__(config, layer_idx)
                self.dropout = nn.Dropout(0.2)
                del self.norm
                self.k_norm = nn.LayerNorm(config.hidden_size)
    """)
    init = methods(out["modeling_child.py"], "ChildAttention")["__init__"]
    assert init == code("""
        def __init__(self, config, layer_idx: int = 0):
            super().__init__()
            self.config = config
            self.q_proj = nn.Linear(config.hidden_size, config.hidden_size)
            self.dropout = nn.Dropout(0.2)
            self.k_norm = nn.LayerNorm(config.hidden_size)
    """)


def test_super_forward_return_is_unrolled_after_statements_before_it(tree):
    out = tree("""
        from ..base.modeling_base import BaseAttention

        class ChildAttention(BaseAttention):
            def forward(self, hidden_states, mask=None, scale: float = 1.0):
                hidden_states = hidden_states * 2
                return super().forward(hidden_states, mask, scale)
    """)
    forward = code('''
        @traced
        def forward(self, hidden_states, mask=None, scale: float = 1.0) -> torch.Tensor:
            """Runs Child attention."""
            hidden_states = hidden_states * 2
            return self.dropout(self.q_proj(hidden_states)) * scale
    ''')
    assert methods(out["modeling_child.py"], "ChildAttention")["forward"] == forward


def test_explicit_base_call_picks_that_parent(tree):
    out = tree("""
        from torch import nn
        from ..base.modeling_base import BaseAttention

        class ChildAttention(BaseAttention):
            def __init__(self, config):
                nn.Module.__init__(self)
                self.proj = nn.Linear(2, 2)
    """)
    assert methods(out["modeling_child.py"], "ChildAttention")["__init__"] == code("""
        def __init__(self, config):
            super().__init__()
            self.proj = nn.Linear(2, 2)
    """)


def test_error_stub_removes_method_and_attribute_error_removes_attribute(tree):
    out = tree("""
        from ..base.modeling_base import BaseAttention

        class ChildAttention(BaseAttention):
            is_causal = AttributeError()

            def reset(self):
                raise AttributeError("Child attention cannot be reset")

            def describe(self):
                raise NotImplementedError("Child attention has no description")
    """)
    attention = definitions(out["modeling_child.py"])["ChildAttention"]
    assert "def reset" not in attention and "is_causal" not in attention
    # any exception whose name ends in "Error" marks the method as removed
    assert "def describe" not in attention
    assert "def forward" in attention


def test_decorators_annotation_and_docstring_follow_the_modular_file_when_written(tree):
    out = tree('''
        from ..base.modeling_base import BaseAttention

        class ChildAttention(BaseAttention):
            @other_decorator
            def forward(self, hidden_states, mask=None, scale: float = 1.0) -> tuple:
                """Child docstring."""
                return hidden_states

            def describe(self):
                return "kept decorators"
    ''')
    attention = methods(out["modeling_child.py"], "ChildAttention")
    assert attention["forward"] == code('''
        @other_decorator
        def forward(self, hidden_states, mask=None, scale: float = 1.0) -> tuple:
            """Child docstring."""
            return hidden_states
    ''')
    # a method that writes no decorator keeps none (the parent's `describe` has none either)
    assert attention["describe"] == code("""
        def describe(self):
            return "kept decorators"
    """)


def test_super_kwargs_expands_to_the_parent_signature(tree):
    out = tree("""
        from ..base.modeling_base import BaseAttention

        class ChildAttention(BaseAttention):
            @new_decorator
            def forward(self, **super_kwargs):
                return super().forward(**super_kwargs)
    """)
    assert methods(out["modeling_child.py"], "ChildAttention")["forward"] == code('''
        @new_decorator
        def forward(self, hidden_states: torch.Tensor, mask=None, scale: float = 1.0) -> torch.Tensor:
            """Runs Child attention."""
            return self.dropout(self.q_proj(hidden_states)) * scale
    ''')


def test_docstring_constant_set_to_none_keeps_the_parent_value(tree):
    out = tree("""
        from ..base.modeling_base import BaseModel

        CHILD_INPUTS_DOCSTRING = None

        class ChildModel(BaseModel):
            pass
    """)
    assert definitions(out["modeling_child.py"])["CHILD_INPUTS_DOCSTRING"] == code(
        'CHILD_INPUTS_DOCSTRING = "Inputs of the Child model."'
    )


def test_modular_definitions_win_over_the_parent_ones(tree):
    out = tree("""
        from ..base.modeling_base import BaseModel

        def base_helper(x):
            return x + 1

        class ChildModel(BaseModel):
            pass
    """)
    found = definitions(out["modeling_child.py"])
    assert found["base_helper"] == code("def base_helper(x):\n    return x + 1")
    assert "CHILD_SCALE" not in found  # only the parent's helper used it


def test_prefix_is_inferred_from_the_class_name(tree):
    out = tree("""
        from ..base.modeling_base import BaseModel

        class ChildTextModel(BaseModel):
            pass
    """)
    found = definitions(out["modeling_child.py"])
    assert {"ChildTextAttention", "ChildTextMLP", "ChildTextModel"} <= set(found)
    # the file part of sibling imports keeps the model's name
    assert "from .configuration_child import ChildTextConfig" in imports(out["modeling_child.py"])


def test_mixed_prefixes_warn_with_the_chosen_one(tree, caplog):
    with caplog.at_level(logging.WARNING, logger="splice.modular"):
        out = tree("""
            from ..base.modeling_base import BaseAttention, BaseMLP, BaseModel

            class ChildTextAttention(BaseAttention):
                pass

            class ChildTextMLP(BaseMLP):
                pass

            class ChildModel(BaseModel):
                pass
        """)
    assert "several prefixes (Child, ChildText); using 'ChildText'" in caplog.text
    assert {"ChildTextMLP", "CHILD_TEXT_SCALE"} <= set(definitions(out["modeling_child.py"]))


def test_more_than_one_model_specific_base_is_an_error_with_its_line(tree):
    from splice.modular import ModularError

    with pytest.raises(
        ModularError, match=r"modular_child\.py:4: class ChildBoth inherits from more than one"
    ):
        tree("""
            from ..base.modeling_base import BaseAttention, BaseMLP


            class ChildBoth(BaseAttention, BaseMLP):
                pass
        """)


def test_statements_before_super_init_follow_the_parents_own_super_init(tree):
    out = tree('''
        from ..base.modeling_base import BaseAttention

        class ChildAttention(BaseAttention):
            def __init__(self, config, layer_idx: int = 0):
                """Child init."""
                self.layer_type = config.layer_types[layer_idx]
                super().__init__(config, layer_idx)
    ''')
    assert methods(out["modeling_child.py"], "ChildAttention")["__init__"] == code('''
        def __init__(self, config, layer_idx: int = 0):
            """Child init."""
            super().__init__()
            self.layer_type = config.layer_types[layer_idx]
            self.config = config
            self.q_proj = nn.Linear(config.hidden_size, config.hidden_size)
            self.dropout = nn.Dropout(0.1)
            self.norm = nn.LayerNorm(config.hidden_size)
    ''')


def test_statements_before_super_call_come_first_when_the_parent_does_not_start_with_super(package):
    root = package(
        {
            "models/base/processing_base.py": """
            class BaseProcessor(ProcessorMixin):
                def __init__(self, tokenizer=None):
                    self.image_token = tokenizer.image_token
                    super().__init__(tokenizer)
        """,
            "models/child/modular_child.py": """
            from ..base.processing_base import BaseProcessor

            class ChildProcessor(BaseProcessor):
                def __init__(self, tokenizer=None, prefix: str = "Q: "):
                    self.prefix = prefix
                    super().__init__(tokenizer)
        """,
        }
    )
    out = convert_file(root / "models/child/modular_child.py")
    assert methods(out["processing_child.py"], "ChildProcessor")["__init__"] == code("""
        def __init__(self, tokenizer=None, prefix: str = "Q: "):
            self.prefix = prefix
            self.image_token = tokenizer.image_token
            super().__init__(tokenizer)
    """)


def test_imported_name_is_renamed_only_when_the_modular_file_provides_the_new_name(package):
    parent = """
        from torch import nn
        from ...modeling_outputs import BaseOutput


        class BaseEncoder(nn.Module):
            def forward(self, x) -> BaseOutput:
                return BaseOutput(x)
    """
    plain = package(
        {
            "models/base/modeling_base.py": parent,
            "models/child/modular_child.py": """
            from ..base.modeling_base import BaseEncoder

            class ChildEncoder(BaseEncoder):
                pass
        """,
        }
    )
    generated = convert_file(plain / "models/child/modular_child.py")["modeling_child.py"]
    assert "return BaseOutput(x)" in definitions(generated)["ChildEncoder"]
    assert "from ...modeling_outputs import BaseOutput" in imports(generated)

    aliased = package(
        {
            "models/base/modeling_base.py": parent,
            "models/child/modular_child.py": """
            from ...modeling_outputs import BaseOutput
            from ..base.modeling_base import BaseEncoder

            ChildOutput = BaseOutput

            class ChildEncoder(BaseEncoder):
                pass
        """,
        },
        name="otherpkg",
    )
    found = definitions(convert_file(aliased / "models/child/modular_child.py")["modeling_child.py"])
    assert "return ChildOutput(x)" in found["ChildEncoder"]
    assert found["ChildOutput"] == code("ChildOutput = BaseOutput")


def test_parent_functions_keep_their_names_and_kernel_decorators(package):
    root = package(
        {
            "models/base/modeling_base.py": '''
            from torch import nn
            from ...integrations import use_kernel_func_from_hub


            @use_kernel_func_from_hub("base_scan", "base_kernels")
            def base_scan(x):
                """Scan of the Base model."""
                return x


            class BaseMixer(nn.Module):
                def forward(self, x):
                    return base_scan(x)
        ''',
            "models/child/modular_child.py": """
            from ..base.modeling_base import BaseMixer

            class ChildMixer(BaseMixer):
                pass
        """,
        }
    )
    found = definitions(convert_file(root / "models/child/modular_child.py")["modeling_child.py"])
    assert found["base_scan"] == code('''
        @use_kernel_func_from_hub("base_scan", "base_kernels")
        def base_scan(x):
            """Scan of the Child model."""
            return x
    ''')
    assert "return base_scan(x)" in found["ChildMixer"]


def test_names_in_all_are_kept_even_when_no_class_uses_them(tree):
    out = tree("""
        from ..base.modeling_base import BaseMLP


        def unused_helper():
            return 1


        class ChildMLP(BaseMLP):
            pass


        if True:
            EXTRA = 1
        __all__ = ["ChildMLP", "unused_helper", "EXTRA"]
        """)["modeling_child.py"]
    found = definitions(out)
    assert found["unused_helper"] == code("def unused_helper():\n    return 1")
    assert code("if True:\n    EXTRA = 1") in code(out)
    assert list(found)[-1] == "__all__"


def test_statement_binding_no_name_is_kept_after_what_it_uses(tree):
    out = tree("""
        from ..base.modeling_base import BaseMLP

        REGISTRY = {}


        def child_kernel(x):
            return x


        class ChildMLP(BaseMLP):
            pass


        REGISTRY["child"] = child_kernel
        """)["modeling_child.py"]
    body = code(out)
    assert body.index("def child_kernel") < body.index("REGISTRY['child'] = child_kernel")
    assert body.index("REGISTRY = {}") < body.index("REGISTRY['child'] = child_kernel")


def test_metaclass_keyword_of_the_child_is_kept(tree):
    out = tree("""
        from ..base.modeling_base import BaseMLP


        class ChildMLP(BaseMLP, metaclass=type):
            pass
        """)["modeling_child.py"]
    assert definitions(out)["ChildMLP"].startswith("class ChildMLP(nn.Module, metaclass=type):")


@pytest.mark.parametrize(
    "statement", ["type Alias = int", "class ChildMLP[T](BaseMLP):\n    pass"], ids=["alias", "class"]
)
def test_pep695_syntax_is_kept_or_an_error_with_its_line(tree, statement):
    import sys

    modular = "from ..base.modeling_base import BaseMLP\n\n" + statement + "\n\n__all__ = ['Alias']\n"
    if sys.version_info >= (3, 12):
        out = tree(modular)["modeling_child.py"]
        assert statement.split(":")[0].split(" =")[0] in out
    else:
        with pytest.raises(ModularError, match=r"modular_child\.py:3: PEP 695 type parameters"):
            tree(modular)
