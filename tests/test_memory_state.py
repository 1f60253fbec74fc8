import pytest
import torch
from transformers import DynamicCache

from hf_llama_mem import generate_with_memory, load_memory, save_memory
from hf_llama_mem.modeling_llama_mem import CACHE_FIELD

from .helpers import assert_close, tiny_model


def prefill(model, ids):
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(ids, cache=cache, use_cache=True)
    return cache


@pytest.mark.parametrize("with_model", [True, False], ids=["fingerprinted", "plain"])
def test_restored_memory_continues_exactly(tmp_path, with_model):
    model = tiny_model()
    ids = torch.randint(1, 256, (2, 70))
    original = prefill(model, ids[:, :50])
    save_memory(original, tmp_path / "memory.safetensors", model=model if with_model else None)
    restored = load_memory(tmp_path / "memory.safetensors", model)
    assert restored.get_seq_length() == 50
    with torch.no_grad():
        full = model(ids).logits[:, 50:]
        from_original = model(ids[:, 50:], cache=original, use_cache=True).logits
        from_restored = model(ids[:, 50:], cache=restored, use_cache=True).logits
    assert torch.equal(from_restored, from_original)
    assert_close(from_restored, full, 1e-4, "restored vs one forward")


def test_restored_memory_generates_the_same(tmp_path):
    model = tiny_model()
    prompt = torch.randint(1, 256, (1, 40))
    cache = prefill(model, prompt[:, :-1])
    save_memory(cache, tmp_path / "m.safetensors", model=model)
    kwargs = dict(max_new_tokens=20, do_sample=False)
    # generate() takes the cache as `cache` from transformers 5.24 on, as `past_key_values` before
    expected = model.generate(prompt, **{CACHE_FIELD: prefill(model, prompt[:, :-1])}, **kwargs)
    assert torch.equal(
        model.generate(prompt, **{CACHE_FIELD: load_memory(tmp_path / "m.safetensors", model)}, **kwargs), expected
    )


@pytest.mark.parametrize(
    "other, message",
    [
        (dict(sliding_window=16), "sliding_window=8, this model has 16"),
        (dict(num_hidden_layers=3), "has 2 layers, but this model has 3"),
        (dict(memory_layers=[1]), "saved with memory=True, this model has False"),
        (dict(num_key_value_heads=4), "expected [batch, 4, tokens, 16]"),
        (dict(), "written by a model with other weights"),
    ],
    ids=["window", "layers", "memory-layers", "heads", "weights"],
)
def test_state_from_another_model_is_refused(tmp_path, other, message):
    model = tiny_model()
    save_memory(prefill(model, torch.randint(1, 256, (1, 30))), tmp_path / "m.safetensors", model=model)
    with pytest.raises(ValueError) as error:
        load_memory(tmp_path / "m.safetensors", tiny_model(**other))
    assert message in str(error.value)


def test_generate_with_memory_over_turns_equals_one_generate_over_the_whole_conversation(tmp_path):
    model = tiny_model()
    turns = [torch.randint(1, 256, (1, n)) for n in (30, 7, 12)]  # 8-token window: later turns see turn 1 via memory
    kwargs = dict(max_new_tokens=6, do_sample=False, min_new_tokens=6)
    cache, history = None, torch.empty(1, 0, dtype=torch.long)
    for index, turn in enumerate(turns):
        if index == 2:  # the last turn continues from disk, as a new session would
            save_memory(cache, tmp_path / "chat.safetensors", model)
            cache = load_memory(tmp_path / "chat.safetensors", model)
        reply, cache = generate_with_memory(model, turn, cache, **kwargs)
        history = torch.cat([history, turn], 1)
        expected = model.generate(history, attention_mask=torch.ones_like(history), **kwargs)[:, history.shape[1] :]
        assert torch.equal(reply, expected), f"turn {index}"
        history = torch.cat([history, reply], 1)
        assert cache.get_seq_length() == history.shape[1]


def test_generate_cli_saves_and_continues_the_memory(tmp_path):
    from transformers import ByT5Tokenizer

    from hf_llama_mem.cli import main

    tokenizer = ByT5Tokenizer()
    model = tiny_model(vocab_size=len(tokenizer))
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    memory = str(tmp_path / "memory.safetensors")
    common = ["generate", "--model", str(tmp_path / "model"), "--max-new-tokens", "4"]
    main([*common, "--prompt", "The first session.", "--save-memory", memory])
    seen = load_memory(memory, model).get_seq_length()
    assert seen == len(tokenizer("The first session.").input_ids) + 4  # the prompt, then every generated token
    main([*common, "--prompt", " Again.", "--load-memory", memory, "--save-memory", memory])
    assert load_memory(memory, model).get_seq_length() == seen + len(" Again.") + 4
