"""The rest of the Hugging Face stack: evaluate modules, pipeline, device_map loading, accelerate configs."""

from pathlib import Path

import evaluate
import pytest
import torch
from accelerate.commands.config.config_args import load_config_from_file
from transformers import AutoModelForCausalLM, ByT5Tokenizer, pipeline

from hf_llama_mem.evals.perplexity import PerplexityByPosition
from hf_llama_mem.metrics import metric_path

from .helpers import tiny_model

ACCELERATE_CONFIGS = Path(__file__).resolve().parents[1] / "examples" / "accelerate"


@pytest.fixture
def byte_model(tmp_path):
    """A small model with the ByT5 byte tokenizer, saved with it, as a user's folder would be."""
    tokenizer = ByT5Tokenizer()
    model = tiny_model(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id)
    model.save_pretrained(tmp_path / "byte_model")
    tokenizer.save_pretrained(tmp_path / "byte_model")
    return str(tmp_path / "byte_model"), model, tokenizer


def test_accuracy_metric_loads_from_its_folder_and_groups_by_distance():
    metric = evaluate.load(metric_path("long_context_accuracy"))
    result = metric.compute(
        predictions=["71432", " 9 ", "1", "2"], references=["71432", "9", "2", "2"], distances=[512, 512, 4096, 4096]
    )
    assert result == {"accuracy": 0.75, "by_distance": {512: 1.0, 4096: 0.5}, "count_by_distance": {512: 2, 4096: 2}}


def test_stream_perplexity_metric_equals_the_eval_task(byte_model):
    path, model, tokenizer = byte_model
    text = "def add(a, b):\n    return a + b\n" * 8
    metric = evaluate.load(metric_path("stream_perplexity"))
    result = metric.compute(predictions=[text], model_id=path, max_tokens=200, segment=64)
    expected = PerplexityByPosition(max_tokens=200, segment=64).evaluate(
        model, [torch.tensor(tokenizer(text).input_ids)], progress=False
    )
    assert result["buckets"] == expected["buckets"] and result["tokens"] == expected["tokens"]
    assert result["overall"] == pytest.approx(expected["overall"], rel=1e-5)


def test_text_generation_pipeline_continues_past_the_window(byte_model):
    path, model, tokenizer = byte_model
    generator = pipeline("text-generation", model=path, tokenizer=tokenizer)
    prompt = "The memory keeps what leaves the window. " * 3  # 120 bytes, window 8
    output = generator(prompt, max_new_tokens=12, do_sample=False)[0]["generated_text"]
    expected = model.generate(**tokenizer(prompt, return_tensors="pt"), max_new_tokens=12, do_sample=False)
    assert output == tokenizer.decode(expected[0], skip_special_tokens=True)
    assert output.startswith(prompt) and len(output) > len(prompt)


def test_device_map_auto_loads_and_never_splits_a_decoder_layer(byte_model, tmp_path):
    path, model, _ = byte_model
    ids = torch.randint(0, 300, (1, 30))
    with torch.no_grad():
        expected = model(ids).logits
        assert torch.equal(AutoModelForCausalLM.from_pretrained(path, device_map="auto")(ids).logits, expected)
        # Too little room in memory: accelerate offloads whole layers to disk and streams them in (its hooks wrap
        # our modules), and the logits stay the same.
        layer_bytes = sum(p.numel() * 4 for p in model.model.layers[0].parameters())
        offloaded = AutoModelForCausalLM.from_pretrained(
            path, device_map="auto", max_memory={"cpu": int(1.5 * layer_bytes)}, offload_folder=str(tmp_path / "off")
        )
        assert "disk" in set(offloaded.hf_device_map.values()), offloaded.hf_device_map
        assert not any(".self_attn" in name or ".mlp" in name for name in offloaded.hf_device_map)
        assert torch.allclose(offloaded(ids).logits, expected, atol=1e-5)


@pytest.mark.parametrize("name", ["ddp", "fsdp", "deepspeed_zero2"])
def test_accelerate_configs_parse_and_name_our_layer(name):
    config = load_config_from_file(str(ACCELERATE_CONFIGS / f"{name}.yaml"))
    assert config.distributed_type.value == {"ddp": "MULTI_GPU", "fsdp": "FSDP", "deepspeed_zero2": "DEEPSPEED"}[name]
    if name == "fsdp":
        assert config.fsdp_config["fsdp_transformer_layer_cls_to_wrap"] in tiny_model()._no_split_modules
    if name == "deepspeed_zero2":
        assert (ACCELERATE_CONFIGS.parents[1] / config.deepspeed_config["deepspeed_config_file"]).is_file()
