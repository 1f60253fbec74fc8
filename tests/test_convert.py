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
            "--surprisal-threshold",
            "2.5",
        ],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    summary = json.loads(result.stdout[result.stdout.index("{") :])
    assert summary["max_abs_logit_diff"] < 1e-4 and summary["checked_sequences"] == 3
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "mem")
    assert (loaded.config.sliding_window, loaded.config.memory_layers) == (16, [1])
    assert loaded.config.memory_write_surprisal_threshold == 2.5  # and still the source within W (checked above)
    card = (tmp_path / "mem" / "README.md").read_text()
    assert "| sliding window W | 16 |" in card and "| layers with memory | 1 |" in card


@pytest.fixture
def llama_folder(tmp_path):
    from transformers import ByT5Tokenizer

    folder = tmp_path / "llama"
    LlamaForCausalLM(LlamaConfig(**{**DIMS, "vocab_size": 384})).save_pretrained(folder)
    ByT5Tokenizer().save_pretrained(folder)
    return folder


def test_convert_checkpoint_carries_the_tokenizer_over(llama_folder, tmp_path):
    from transformers import AutoTokenizer

    from hf_llama_mem.convert_llama import convert_checkpoint

    summary = convert_checkpoint(llama_folder, tmp_path / "mem", sliding_window=WINDOW)
    assert summary["tokenizer"] and summary["max_abs_logit_diff"] <= 1e-5
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "mem")
    assert tokenizer("abc").input_ids == AutoTokenizer.from_pretrained(llama_folder)("abc").input_ids
    assert tokenizer.model_max_length >= 1e30, "the converted model's context is unbounded"


def test_convert_never_writes_over_the_source_nor_into_another_model(llama_folder, tmp_path):
    from hf_llama_mem.convert_llama import convert_checkpoint

    before = (llama_folder / "model.safetensors").read_bytes()
    for overwrite in (False, True):
        with pytest.raises(ValueError, match="is the source's own folder"):
            convert_checkpoint(llama_folder, llama_folder, sliding_window=WINDOW, overwrite=overwrite)
    assert (llama_folder / "model.safetensors").read_bytes() == before
    other = tmp_path / "other"
    convert_checkpoint(llama_folder, other, sliding_window=WINDOW)
    with pytest.raises(ValueError, match="already holds files .*--overwrite"):
        convert_checkpoint(llama_folder, other, sliding_window=2 * WINDOW)
    convert_checkpoint(llama_folder, other, sliding_window=2 * WINDOW, overwrite=True)
    assert AutoModelForCausalLM.from_pretrained(other).config.sliding_window == 2 * WINDOW


def test_convert_cli_refuses_its_source_as_destination_in_one_line(llama_folder, capsys):
    from hf_llama_mem.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["convert", str(llama_folder), str(llama_folder), "--sliding-window", "8"])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err.strip()
    assert "source's own folder" in error and len(error.splitlines()) == 1


def test_plain_copy_and_a_typo_in_the_settings(llama_folder, tmp_path):
    from hf_llama_mem.convert_llama import convert_checkpoint

    summary = convert_checkpoint(llama_folder, tmp_path / "plain", plain=True)
    assert summary["model_type"] == "llama"
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "plain").config.model_type == "llama"
    with pytest.raises(ValueError, match=r"Unknown LlamaMemConfig field\(s\) \['sliding_windw'\]"):
        LlamaMemForCausalLM.from_llama(str(llama_folder), sliding_windw=8)


def test_tying_an_untied_source_is_refused():
    llama = LlamaForCausalLM(LlamaConfig(**DIMS, tie_word_embeddings=False))
    with pytest.raises(ValueError, match="would drop the source's own lm_head"):
        LlamaMemForCausalLM.from_llama(llama, sliding_window=WINDOW, tie_word_embeddings=True)


def test_from_llama_verifies_the_conversion():
    llama = LlamaForCausalLM(LlamaConfig(**DIMS)).eval()
    converted = LlamaMemForCausalLM.from_llama(llama, sliding_window=WINDOW)
    assert converted.conversion_check["checked_sequences"] == 3
    assert converted.conversion_check["max_abs_logit_diff"] <= 1e-5
    from hf_llama_mem.convert_llama import verify_conversion

    with pytest.raises(ValueError, match="num_sequences must be >= 1"):
        verify_conversion(llama, converted, num_sequences=0)


def test_verify_conversion_refuses_a_conversion_that_changed_the_window():
    llama = LlamaForCausalLM(LlamaConfig(**DIMS)).eval()
    converted = LlamaMemForCausalLM.from_llama(llama, sliding_window=WINDOW)
    from hf_llama_mem.convert_llama import verify_conversion

    with torch.no_grad():
        converted.model.layers[0].self_attn.v_proj.weight.add_(0.05)  # a copy fault of the size a wrong weight makes
    with pytest.raises(ValueError, match=r"Converted model differs from the source by .* \(tolerance 1e-04\)"):
        verify_conversion(llama, converted)


def test_the_tolerance_relative_to_the_logits_is_for_gated_conversions_only():
    """Only a surprisal-gated model rounds differently from its source (it runs in pieces through a cache); an
    ungated conversion with large logits is held to the absolute 1e-4."""
    from hf_llama_mem.convert_llama import verify_conversion

    llama = LlamaForCausalLM(LlamaConfig(**DIMS)).eval()
    ids = torch.randint(0, DIMS["vocab_size"], (1, WINDOW))
    with torch.no_grad():
        llama.lm_head.weight.mul_(200.0 / llama(ids).logits.abs().max())  # logits up to about 200
    converted = LlamaMemForCausalLM.from_llama(llama, sliding_window=WINDOW)
    with torch.no_grad():
        converted.model.norm.weight.mul_(1 + 2.5e-6)  # off by about 5e-4: over 1e-4, under 2e-5 x 200
    with pytest.raises(ValueError, match=r"differs from the source by .* \(tolerance 1e-04\)"):
        verify_conversion(llama, converted)
    converted.config.memory_write_surprisal_threshold = 2.0
    assert 1e-4 < verify_conversion(llama, converted)["max_abs_logit_diff"] < 2e-5 * 200


def test_a_delta_from_extend_is_applied_by_convert(llama_folder, tmp_path):
    from hf_llama_mem.convert_llama import convert_checkpoint
    from hf_llama_mem.extend import DELTA_FILE, ExtendSettings, extend

    settings = ExtendSettings(
        steps=2,
        batch_size=1,
        length_start=320,
        length_end=320,
        length_multiple=32,
        sliding_window=16,
        warmup_steps=1,
        chat_fraction=0.0,
        progress=False,
        save_model=True,
    )
    extend(str(llama_folder), tmp_path / "run", settings)
    delta = tmp_path / "run" / DELTA_FILE
    with pytest.raises(ValueError, match=r"trained with memory_layers=\[0, 1\]; the conversion asks for \[0\]"):
        convert_checkpoint(llama_folder, tmp_path / "bad", delta=delta, memory_layers=[0])
    summary = convert_checkpoint(llama_folder, tmp_path / "mem", delta=delta)
    assert summary["sliding_window"] == 16 and summary["max_abs_logit_diff"] <= 1e-5
    converted = AutoModelForCausalLM.from_pretrained(tmp_path / "mem").eval()
    trained = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "model").eval()
    # No memory parameter depends on W, so the delta reads at another window too: its tensors, checked within W.
    longer = convert_checkpoint(llama_folder, tmp_path / "w32", delta=delta, sliding_window=32)
    assert longer["sliding_window"] == 32 and longer["max_abs_logit_diff"] <= 1e-5
    at_32 = AutoModelForCausalLM.from_pretrained(tmp_path / "w32")
    assert at_32.config.sliding_window == 32
    for param, wanted in zip(at_32.memory_parameters(), trained.memory_parameters(), strict=True):
        assert torch.equal(param, wanted)
    ids = torch.randint(0, 384, (1, 80))
    with torch.no_grad():
        assert_close(converted(ids).logits, trained(ids).logits, 1e-5, "delta applied by convert")
    with pytest.raises(FileNotFoundError, match="neither a delta file nor a shipped delta"):
        convert_checkpoint(llama_folder, tmp_path / "none", delta="no-such-delta")
