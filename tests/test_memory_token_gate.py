"""The per-token read gate in a recipe (config.memory_token_gate; how every path applies it is in
test_memory_projection.py): a later `extend` stage can add it to a delta trained without one, and that delta applies
to a model with a gate as exactly the model it was trained on."""

import pytest
import torch

from hf_llama_mem import LlamaMemForCausalLM
from hf_llama_mem.extend import ExtendSettings, apply_delta, delta_conversion, extend, read_delta_metadata

from .test_extend import SETTINGS, one_thread, source  # noqa: F401 (fixtures)
from .test_memory_projection import TOKEN_GATE, with_random


def test_a_delta_without_a_token_gate_applies_to_a_model_with_one_as_its_own_model(source, tmp_path):  # noqa: F811
    delta = extend(source, tmp_path, ExtendSettings(**{**SETTINGS, "steps": 2, "memory_token_gate": False}))
    conversion = delta_conversion(delta)
    assert conversion["memory_token_gate"] is False
    plain = apply_delta(LlamaMemForCausalLM.from_llama(source, **conversion), delta)
    gated = LlamaMemForCausalLM.from_llama(source, **{**conversion, "memory_token_gate": True})
    apply_delta(with_random(gated, TOKEN_GATE), delta)  # the gate's weights are reset to zero
    ids = torch.randint(1, plain.config.vocab_size, (1, 3 * plain.config.sliding_window))
    with torch.no_grad():
        assert torch.equal(gated(ids).logits, plain(ids).logits)


def test_a_delta_with_a_token_gate_is_refused_by_a_model_without_one(source, tmp_path):  # noqa: F811
    delta = extend(source, tmp_path, ExtendSettings(**{**SETTINGS, "steps": 1, "memory_token_gate": True}))
    model = LlamaMemForCausalLM.from_llama(source, **{**delta_conversion(delta), "memory_token_gate": False})
    with pytest.raises(ValueError, match="memory_token_gate: delta True, model False"):
        apply_delta(model, delta)


def test_a_later_stage_adds_a_token_gate_and_trains_it(source, tmp_path):  # noqa: F811
    first = extend(source, tmp_path / "first", ExtendSettings(**{**SETTINGS, "steps": 1, "memory_token_gate": False}))
    settings = ExtendSettings(**{**SETTINGS, "steps": 2, "init_delta": str(first), "memory_token_gate": True})
    second = extend(source, tmp_path / "second", settings)
    assert read_delta_metadata(first)["memory_token_gate"] is False
    assert read_delta_metadata(second)["memory_token_gate"] is True
    model = apply_delta(LlamaMemForCausalLM.from_llama(source, **delta_conversion(second)), second)
    gates = [p for n, p in model.named_parameters() if n.endswith(TOKEN_GATE)]
    assert gates and all(p.abs().max() > 0 for p in gates)  # trained away from its zero start
    assert ExtendSettings().memory_token_gate is None  # the default comes from DEFAULT_CONVERSION (False)
