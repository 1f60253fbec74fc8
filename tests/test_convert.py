import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
)

from hf_llama_mem import LlamaMemForCausalLM

from .helpers import TINY_DIMS, assert_close

WINDOW = 8
DIMS = TINY_DIMS


def windowed_reference(llama: LlamaForCausalLM, attn: str) -> MistralForCausalLM:
    """transformers' own sliding-window Llama-family model (Mistral) with the Llama's weights."""
    config = MistralConfig(**DIMS, sliding_window=WINDOW, rope_parameters=llama.config.rope_parameters)
    config._attn_implementation = attn
    reference = MistralForCausalLM(config).eval()
    reference.load_state_dict(llama.state_dict())
    return reference


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_converted_llama_equals_source_within_and_windowed_source_beyond(attn):
    llama = LlamaForCausalLM(LlamaConfig(**DIMS)).eval()
    llama.config._attn_implementation = attn
    converted = LlamaMemForCausalLM.from_llama(llama, sliding_window=WINDOW)
    ids = torch.randint(0, 256, (2, 6 * WINDOW))
    with torch.no_grad():
        assert_close(converted(ids[:, :WINDOW]).logits, llama(ids[:, :WINDOW]).logits, 1e-5, "within the window")
        assert_close(converted(ids).logits, windowed_reference(llama, attn)(ids).logits, 1e-5, "beyond the window")


def test_mistral_source_keeps_its_window():
    config = MistralConfig(**DIMS, sliding_window=WINDOW)
    mistral = MistralForCausalLM(config).eval()
    converted = LlamaMemForCausalLM.from_llama(mistral)
    assert converted.config.sliding_window == WINDOW
    ids = torch.randint(0, 256, (1, 40))
    with torch.no_grad():
        assert_close(converted(ids).logits, mistral(ids).logits, 1e-5, "logits")


def test_every_source_tensor_used_once_and_only_memory_is_new():
    llama = LlamaForCausalLM(LlamaConfig(**DIMS))
    converted = LlamaMemForCausalLM.from_llama(llama, sliding_window=WINDOW)
    source, target = llama.state_dict(), converted.state_dict()
    assert set(target) - set(source) == {name for name in target if ".memory." in name}
    assert set(source) <= set(target)
    for name, tensor in source.items():
        assert torch.equal(target[name], tensor), name
    assert all(p.abs().sum() == 0 for n, p in converted.named_parameters() if n.endswith("memory.gate"))


def test_unexpected_source_tensor_is_named():
    llama = LlamaForCausalLM(LlamaConfig(**DIMS, attention_bias=False))
    llama.model.layers[0].self_attn.register_buffer("extra_scale", torch.ones(1))
    with pytest.raises(ValueError, match=r"unused source tensors \['model.layers.0.self_attn.extra_scale'\]"):
        LlamaMemForCausalLM.from_llama(llama, sliding_window=WINDOW)


def test_non_llama_source_is_refused(tmp_path):
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64))
    with pytest.raises(ValueError, match="Expected a Llama-family causal LM .* got model_type 'gpt2'"):
        LlamaMemForCausalLM.from_llama(gpt2)
    gpt2.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="got model_type 'gpt2'"):
        LlamaMemForCausalLM.from_llama(str(tmp_path))


def test_converted_model_saves_and_loads_through_auto_class(tmp_path):
    llama = LlamaForCausalLM(LlamaConfig(**DIMS)).eval()
    llama.save_pretrained(tmp_path / "llama")
    converted = LlamaMemForCausalLM.from_llama(str(tmp_path / "llama"), sliding_window=WINDOW, memory_rule="delta")
    converted.save_pretrained(tmp_path / "mem")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "mem").eval()
    ids = torch.randint(0, 256, (1, 30))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, converted(ids).logits)
    assert loaded.config.memory_rule == "delta"


def test_convert_cli_end_to_end(tmp_path):
    import json
    import subprocess
    import sys

    LlamaForCausalLM(LlamaConfig(**DIMS)).save_pretrained(tmp_path / "llama")
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "hf_llama_mem.cli",
            "convert",
            str(tmp_path / "llama"),
            str(tmp_path / "mem"),
            "--sliding-window",
            "16",
            "--memory-layers",
            "1",
        ],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    summary = json.loads(result.stdout[result.stdout.index("{") :])
    assert summary["max_abs_logit_diff"] < 1e-4 and summary["checked_sequences"] == 3
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "mem")
    assert (loaded.config.sliding_window, loaded.config.memory_layers) == (16, [1])
    card = (tmp_path / "mem" / "README.md").read_text()
    assert "| sliding window W | 16 |" in card and "| layers with memory | 1 |" in card
