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


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(num_attention_heads=0), "num_attention_heads must be >= 1, got 0"),
        (dict(head_dim=0), "head_dim must be >= 1, got 0"),
        (dict(vocab_size=-1), "vocab_size must be >= 1, got -1"),
        (dict(hidden_size=0), "hidden_size must be >= 1, got 0"),
        (dict(intermediate_size=0), "intermediate_size must be >= 1, got 0"),
        (dict(num_hidden_layers=0), "num_hidden_layers must be >= 1, got 0"),
        (dict(memory_conv_size=0), "memory_conv_size must be >= 1, got 0"),
        (dict(memory_chunk_size=10**9), "memory_chunk_size must be at most 1024, got 1000000000"),
        (dict(memory_layers=[0, 0]), "memory_layers lists layer 0 more than once"),
    ],
    ids=[
        "heads-zero",
        "head-dim-zero",
        "vocab-negative",
        "hidden-zero",
        "mlp-zero",
        "layers-zero",
        "conv-zero",
        "chunk-huge",
        "layers-duplicate",
    ],
)
def test_more_bad_values_raise_value_error_naming_them(overrides, message):
    with pytest.raises(ValueError) as error:
        tiny_config(**overrides)
    assert message in str(error.value)


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("sliding_window", 0, "sliding_window must be >= 1, got 0"),
        ("memory_rule", "zzz", "memory_rule must be one of ('gated_delta', 'delta'), got 'zzz'"),
        ("num_hidden_layers", 3, "num_hidden_layers (3) does not match layer_types"),
        ("num_attention_heads", 0, "num_attention_heads must be >= 1, got 0"),
        ("head_dim", 0, "head_dim must be >= 1, got 0"),
        ("vocab_size", -1, "vocab_size must be >= 1, got -1"),
        ("memory_chunk_size", 10**9, "memory_chunk_size must be at most 1024"),
        ("memory_layers", [1, 1], "memory_layers lists layer 1 more than once"),
        ("memory_layers", [5], "memory_layers contains 5"),
    ],
)
def test_a_model_built_from_a_config_changed_after_construction_refuses_it(field, value, message):
    from hf_llama_mem import LlamaMemForCausalLM, LlamaMemModel

    config = tiny_config()
    setattr(config, field, value)  # assignment checks only the type; the value is checked before any use
    with pytest.raises(ValueError) as error:
        config.validate_memory_settings()
    assert message in str(error.value)
    for model_class in (LlamaMemModel, LlamaMemForCausalLM):
        with pytest.raises(ValueError) as error:
            model_class(config)
        assert message in str(error.value)


def test_changing_the_layer_count_with_its_layer_types_builds_a_model():
    from hf_llama_mem import LlamaMemForCausalLM

    config = tiny_config()
    config.num_hidden_layers, config.layer_types = 3, ["hybrid_sliding"] * 3
    assert len(LlamaMemForCausalLM(config).model.layers) == 3


@pytest.mark.parametrize(
    "field, value, expected",
    [("sliding_window", "8", TypeError), ("memory_layers", [True], TypeError), ("initializer_range", 5.0, ValueError)],
)
def test_a_wrong_type_is_a_type_error_and_still_huggingface_hubs_error(field, value, expected):
    from huggingface_hub.errors import StrictDataclassFieldValidationError

    for make in (lambda: tiny_config(**{field: value}), lambda: setattr(tiny_config(), field, value)):
        with pytest.raises(expected) as error:
            make()
        assert isinstance(error.value, StrictDataclassFieldValidationError)  # code that catches that keeps working
        assert field in str(error.value)


def test_validate_of_a_mutated_config_is_a_value_error(tmp_path):
    config = tiny_config()
    config.memory_rule = "zzz"
    with pytest.raises(ValueError, match="memory_rule must be one of"):
        config.validate()
    with pytest.raises(ValueError, match="memory_rule must be one of"):
        config.save_pretrained(tmp_path)
