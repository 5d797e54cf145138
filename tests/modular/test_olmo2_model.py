"""A generated ``modeling_olmo2.py`` builds the same model as the shipped one: same weights, same outputs."""

from __future__ import annotations

import importlib.util
import sys

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")


def _load_generated(tmp_path):
    from modular_corpus import corpus_root

    from splice.modular import convert_file

    generated = convert_file(corpus_root() / "olmo2" / "modular_olmo2.py")
    path = tmp_path / "modeling_olmo2.py"
    path.write_text(generated["modeling_olmo2.py"], encoding="utf-8")
    # Loaded as a sibling of the shipped file so its relative imports (`...utils`, `.configuration_olmo2`)
    # resolve inside the installed package; the module name is new, so nothing shipped is replaced.
    name = "transformers.models.olmo2._splice_generated_modeling_olmo2"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    finally:
        sys.modules.pop(name, None)
    return module


def test_generated_olmo2_matches_shipped_model(tmp_path):
    from transformers.models.olmo2 import modeling_olmo2 as shipped
    from transformers.models.olmo2.configuration_olmo2 import Olmo2Config

    generated = _load_generated(tmp_path)
    config = Olmo2Config(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        pad_token_id=0,
    )
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    reference = shipped.Olmo2ForCausalLM(config).eval()
    torch.manual_seed(0)
    candidate = generated.Olmo2ForCausalLM(config).eval()

    assert type(candidate).__module__ == generated.__name__
    reference_state, candidate_state = reference.state_dict(), candidate.state_dict()
    assert list(candidate_state) == list(reference_state)
    for key, value in reference_state.items():
        assert torch.equal(candidate_state[key], value), key

    input_ids = torch.randint(1, 64, (2, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = reference(input_ids=input_ids).logits
        actual = candidate(input_ids=input_ids).logits
    assert torch.equal(actual, expected)
