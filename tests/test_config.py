import pytest
from transformers import AutoConfig

from hf_llama_mem import LlamaMemConfig

from .helpers import tiny_config


def test_defaults_give_memory_in_every_layer():
    config = tiny_config()
    assert config.model_type == "llama_mem"
    assert config.memory_rule == "gated_delta" and config.memory_layers is None
    assert config.layer_types == ["hybrid_sliding", "hybrid_sliding"]


def test_memory_layers_select_cache_layer_types():
    assert tiny_config(num_hidden_layers=3, memory_layers=[1]).layer_types == [
        "sliding_attention",
        "hybrid_sliding",
        "sliding_attention",
    ]
    assert tiny_config(memory_layers=[]).layer_types == ["sliding_attention"] * 2


def test_round_trip_and_auto_config(tmp_path):
    config = tiny_config(memory_rule="delta", memory_layers=[0])
    config.save_pretrained(tmp_path)
    loaded = AutoConfig.from_pretrained(tmp_path)
    assert isinstance(loaded, LlamaMemConfig)
    assert loaded.to_diff_dict() | {"_name_or_path": ""} == config.to_diff_dict() | {"_name_or_path": ""}
    assert (loaded.memory_rule, loaded.memory_layers, loaded.sliding_window) == ("delta", [0], 8)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(sliding_window=0), "sliding_window must be >= 1, got 0"),
        (dict(memory_chunk_size=0), "memory_chunk_size must be >= 1, got 0"),
        (dict(memory_rule="lstm"), "memory_rule must be one of"),
        (dict(memory_layers=[2]), "memory_layers contains 2"),
        (dict(memory_layers=[-1]), "memory_layers contains -1"),
        (dict(hidden_size=66), "hidden_size (66) must be a multiple of num_attention_heads (4)"),
        (dict(num_key_value_heads=3), "num_attention_heads (4) must be a multiple of num_key_value_heads (3)"),
    ],
    ids=["window", "chunk", "rule", "layer-high", "layer-negative", "heads", "kv-heads"],
)
def test_bad_values_raise_value_error_naming_them(overrides, message):
    with pytest.raises(ValueError) as error:
        tiny_config(**overrides)
    assert message in str(error.value)


def test_memory_gate_init_sets_fresh_gates_and_refuses_non_finite():
    from hf_llama_mem import LlamaMemForCausalLM

    model = LlamaMemForCausalLM(tiny_config(memory_gate_init=0))
    assert all(layer.self_attn.memory.gate.eq(0).all() for layer in model.model.layers)
    with pytest.raises(ValueError, match="memory_gate_init must be a finite number, got nan"):
        tiny_config(memory_gate_init=float("nan"))
