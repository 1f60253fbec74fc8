import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
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


def test_a_memory_file_keeps_every_state_of_the_cache_layers_as_they_are(tmp_path):
    """Format 3: per layer the attention keys and values (values [B, Hkv, tokens, D], as transformers keeps them), on a
    memory layer the float32 memory entries of the same tokens, the conv state and the memory matrix; a loaded cache
    holds exactly what was saved, in the layer classes the model uses."""
    model = tiny_model(memory_layers=[1])
    cache = prefill(model, torch.randint(1, 256, (2, 30)))
    save_memory(cache, tmp_path / "m.safetensors", model=model)
    with safe_open(tmp_path / "m.safetensors", framework="pt") as handle:
        assert handle.metadata()["format_version"] == "3"
        names = set(handle.keys())
    assert names == {"layers.0.keys", "layers.0.values"} | {
        f"layers.1.{kind}" for kind in ("keys", "values", "memory_entries", "conv_states", "recurrent_states")
    }
    restored = load_memory(tmp_path / "m.safetensors", model)
    head_dim = model.config.head_dim
    for index, (got, saved) in enumerate(zip(restored.layers, cache.layers, strict=True)):
        assert type(got) is type(saved), f"layer {index}"
        assert got.values.shape[-1] == head_dim
        for kind in ("keys", "values", "memory_entries"):
            if getattr(saved, kind, None) is not None:
                assert torch.equal(getattr(got, kind), getattr(saved, kind)), f"layer {index} {kind}"
    assert restored.layers[1].memory_entries.dtype == torch.float32
    assert torch.equal(restored.layers[1].recurrent_states[0], cache.layers[1].recurrent_states[0])
    assert torch.equal(restored.layers[1].conv_states[0], cache.layers[1].conv_states[0])


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


# ---- a damaged or foreign file is refused by name (issue 18, item 5) ----


def saved_state(tmp_path, model, ids):
    path = tmp_path / "m.safetensors"
    save_memory(prefill(model, ids), path, model=model)
    with safe_open(path, framework="pt") as handle:
        metadata = handle.metadata()
    return path, load_file(path), metadata


def rewrite(path, tensors, metadata):
    save_file({name: tensor.contiguous() for name, tensor in tensors.items()}, path, metadata=metadata)
    return path


def drop(name):
    return lambda tensors, metadata: tensors.pop(name)


def set_tensor(name, make):
    return lambda tensors, metadata: tensors.__setitem__(name, make(tensors[name]))


def set_metadata(key, value):
    def change(tensors, metadata):
        if value is None:
            metadata.pop(key)
        else:
            metadata[key] = value

    return change


@pytest.mark.parametrize(
    "damage, message",
    [
        (drop("layers.0.recurrent_states"), "layers.0.recurrent_states is missing"),
        (drop("layers.1.conv_states"), "layers.1.conv_states is missing"),
        (drop("layers.1.values"), "layers.1.values is missing"),
        (drop("layers.0.memory_entries"), "layers.0.memory_entries is missing"),
        (
            set_tensor("layers.1.memory_entries", lambda t: t.half()),
            "layers.1.memory_entries has dtype torch.float16, expected torch.float32",
        ),
        (set_tensor("layers.0.recurrent_states", lambda t: t.bfloat16()), "layers.0.recurrent_states has dtype"),
        (set_tensor("layers.1.keys", lambda t: t.long()), "layers.1.keys has dtype torch.int64"),
        (set_tensor("layers.0.conv_states", lambda t: t[..., :1]), "layers.0.conv_states has shape"),
        (set_tensor("layers.0.recurrent_states", lambda t: t[:, :1]), "layers.0.recurrent_states has shape"),
        (set_tensor("layers.1.keys", lambda t: t[:1]), "layers.1.keys holds a batch of 1"),
        (
            lambda tensors, metadata: tensors.update(
                {f"layers.0.{kind}": torch.cat([tensors[f"layers.0.{kind}"]] * 2, 2) for kind in ("keys", "values")}
            ),
            "holds 14 window tokens, but a window of 8 keeps at most 7",
        ),
        (lambda tensors, metadata: tensors.__setitem__("extra", torch.zeros(1)), "unexpected tensor 'extra'"),
        (set_metadata("seen_tokens", "-3"), "seen_tokens must be a whole number >= 0, got '-3'"),
        (set_metadata("seen_tokens", "abc"), "seen_tokens must be a whole number >= 0, got 'abc'"),
        (set_metadata("seen_tokens", "5"), "seen_tokens=5 but layers.0.keys holds 7 window tokens"),
        (set_metadata("seen_tokens", None), "has no 'seen_tokens' in its metadata"),
        (set_metadata("layout", None), "has no 'layout' in its metadata"),
        (set_metadata("weights", None), "has no 'weights' in its metadata"),
        (set_metadata("layout", "[{]"), "layout is not valid JSON"),
        (set_metadata("format_version", "1"), "format 1"),
        (set_metadata("format_version", "2"), "format 2 (an earlier hf_llama_mem, which kept the memory's entries"),
    ],
    ids=[
        "no-recurrent", "no-conv", "no-values", "no-memory-entries", "memory-entries-fp16", "recurrent-bf16",
        "keys-int", "conv-shape", "recurrent-shape",
        "batch", "oversize-window", "extra-tensor", "seen-negative", "seen-text", "seen-inconsistent",
        "no-seen", "no-layout", "no-weights", "layout-json", "old-format", "format-2",
    ],
)  # fmt: skip
def test_a_damaged_memory_file_is_refused_naming_what_is_wrong(tmp_path, damage, message):
    model = tiny_model()
    path, tensors, metadata = saved_state(tmp_path, model, torch.randint(1, 256, (2, 30)))
    damage(tensors, metadata)
    rewrite(path, tensors, metadata)
    with pytest.raises(ValueError) as error:
        load_memory(path, model)
    assert message in str(error.value)


def test_a_file_that_is_not_safetensors_is_a_value_error(tmp_path):
    (tmp_path / "junk.safetensors").write_bytes(b"not a memory file at all")
    with pytest.raises(ValueError, match="is not a safetensors file"):
        load_memory(tmp_path / "junk.safetensors", tiny_model())


@pytest.mark.parametrize(
    "parameter, index",
    [
        ("model.embed_tokens.weight", -1),
        ("model.layers.0.mlp.down_proj.weight", -1),
        ("model.layers.1.self_attn.k_proj.weight", -1),
    ],
    ids=["embedding-last-element", "earlier-layer-mlp", "k-proj-last-element"],
)  # fmt: skip
def test_the_fingerprint_covers_every_element_of_every_weight_the_state_depends_on(tmp_path, parameter, index):
    model = tiny_model()
    path, _, _ = saved_state(tmp_path, model, torch.randint(1, 256, (1, 30)))
    with torch.no_grad():
        model.get_parameter(parameter).view(-1)[index] += 0.05  # changes what the window and memory hold
    with pytest.raises(ValueError, match="written by a model with other weights"):
        load_memory(path, model)


def test_the_same_weights_at_another_precision_share_the_fingerprint_and_continue(tmp_path):
    import copy

    model = tiny_model()
    ids = torch.randint(1, 256, (1, 40))
    path, _, _ = saved_state(tmp_path, model, ids[:, :30])
    half = copy.deepcopy(model).to(torch.bfloat16)
    cache = load_memory(path, half)  # fp32 state into the bf16 copy: window cast, memory matrices stay float32
    assert cache.layers[0].keys.dtype == torch.bfloat16 and cache.layers[0].recurrent_states[0].dtype == torch.float32
    with torch.no_grad():
        continued = half(ids[:, 30:], cache=cache, use_cache=True).logits.float()
        full = model(ids).logits[:, 30:]
    assert_close(continued, full, 0.1, "bf16 continuation vs fp32 forward")
    # and back: what the bf16 copy saves loads into the fp32 model
    save_memory(cache, tmp_path / "half.safetensors", model=half)
    assert load_memory(tmp_path / "half.safetensors", model).layers[0].keys.dtype == torch.float32


@pytest.mark.parametrize("placement", ["cpu-device-map", "disk-offload"])
def test_a_model_loaded_with_a_device_map_or_offloaded_to_disk_saves_and_loads_its_memory(tmp_path, placement):
    from transformers import AutoModelForCausalLM

    model = tiny_model()
    model.save_pretrained(tmp_path / "model")
    if placement == "cpu-device-map":
        kwargs = dict(device_map={"": "cpu"})
    else:  # too little room: accelerate keeps whole layers on disk (meta tensors) and streams them in through hooks
        layer_bytes = sum(p.numel() * 4 for p in model.model.layers[0].parameters())
        kwargs = dict(
            device_map="auto", max_memory={"cpu": int(1.5 * layer_bytes)}, offload_folder=str(tmp_path / "o")
        )
    placed = AutoModelForCausalLM.from_pretrained(tmp_path / "model", **kwargs).eval()
    if placement == "disk-offload":
        assert "disk" in set(placed.hf_device_map.values())
    ids = torch.randint(1, 256, (1, 40))
    save_memory(prefill(placed, ids[:, :30]), tmp_path / "placed.safetensors", model=placed)
    save_memory(prefill(model, ids[:, :30]), tmp_path / "plain.safetensors", model=model)
    with torch.no_grad():
        full = model(ids).logits[:, 30:]
        for saved, target in [("placed", placed), ("placed", model), ("plain", placed)]:
            cache = load_memory(tmp_path / f"{saved}.safetensors", target)
            continued = target(ids[:, 30:], cache=cache, use_cache=True).logits
            assert_close(
                continued, full, 1e-4, f"{saved} state continued by {target is placed and 'placed' or 'plain'}"
            )


# ---- what a continued generation sees of its history (issue 18, item 2) ----

HISTORY_KWARGS = dict(
    max_new_tokens=8, min_new_tokens=8, do_sample=False, repetition_penalty=3.0, no_repeat_ngram_size=2
)


def test_history_based_processors_see_the_real_history_across_turns_and_sessions(tmp_path):
    # repetition_penalty and no_repeat_ngram_size read the whole history: each reply must equal generate() over the
    # whole conversation, also after the memory went through a file.
    model = tiny_model()
    turns = [torch.randint(1, 256, (1, n)) for n in (20, 6, 9)]
    turns[1][0, :3] = turns[0][0, 5:8]  # repeats, so the history matters to both processors
    cache, history = None, torch.empty(1, 0, dtype=torch.long)
    for index, turn in enumerate(turns):
        if index == 2:
            save_memory(cache, tmp_path / "chat.safetensors", model)
            cache = load_memory(tmp_path / "chat.safetensors", model)
        reply, cache = generate_with_memory(model, turn, cache, **HISTORY_KWARGS)
        history = torch.cat([history, turn], 1)
        expected = model.generate(history, attention_mask=torch.ones_like(history), **HISTORY_KWARGS)
        assert torch.equal(reply, expected[:, history.shape[1] :]), f"turn {index}"
        history = torch.cat([history, reply], 1)
        assert cache.get_seq_length() == history.shape[1]


def test_history_based_processors_are_refused_on_a_cache_whose_history_is_unknown():
    model = tiny_model()
    cache = prefill(model, torch.randint(1, 256, (1, 20)))  # a plain forward: the ids are not kept
    for kwargs, name in [
        (dict(repetition_penalty=1.2), "repetition_penalty"),
        (dict(no_repeat_ngram_size=2), "no_repeat_ngram_size"),
    ]:
        with pytest.raises(ValueError, match=name):
            generate_with_memory(model, torch.randint(1, 256, (1, 3)), cache, max_new_tokens=2, **kwargs)
        assert cache.get_seq_length() == 20
    reply, cache = generate_with_memory(model, torch.randint(1, 256, (1, 3)), cache, max_new_tokens=2)  # others run
    assert reply.shape == (1, 2) and cache.get_seq_length() == 25


def test_a_padded_history_that_went_stale_asks_for_the_whole_mask():
    model = tiny_model()
    ids, mask = torch.randint(1, 256, (2, 10)), torch.ones(2, 10, dtype=torch.long)
    mask[0, :3] = 0
    _, cache = generate_with_memory(model, ids, None, attention_mask=mask, max_new_tokens=2)
    more = torch.randint(1, 256, (2, 2))
    whole = torch.cat([mask, torch.ones(2, 4, dtype=torch.long)], 1)
    with torch.no_grad():
        model(more, attention_mask=whole, cache=cache, use_cache=True)  # outside generate_with_memory
    with pytest.raises(ValueError, match="pass attention_mask for the whole history"):
        generate_with_memory(model, more, cache, max_new_tokens=2)
    full_mask = torch.cat([whole, torch.ones(2, 2, dtype=torch.long)], 1)
    reply, cache = generate_with_memory(model, more, cache, attention_mask=full_mask, max_new_tokens=2)
    assert reply.shape == (2, 2) and cache.get_seq_length() == 18


def test_an_empty_turn_is_refused_and_leaves_the_memory_as_it_was(tmp_path):
    model = tiny_model()
    _, cache = generate_with_memory(model, torch.randint(1, 256, (1, 10)), None, max_new_tokens=3)
    save_memory(cache, tmp_path / "m.safetensors", model)
    with pytest.raises(ValueError, match="no new token"):
        generate_with_memory(model, torch.empty(1, 0, dtype=torch.long), cache, max_new_tokens=3)
    assert cache.get_seq_length() == 13
    with pytest.raises(ValueError, match="no new token"):
        generate_with_memory(model, torch.empty(1, 0, dtype=torch.long), None, max_new_tokens=3)


def test_generate_cli_with_an_empty_prompt_does_not_touch_a_saved_memory(tmp_path):
    from transformers import ByT5Tokenizer

    from hf_llama_mem.cli import main

    tokenizer = ByT5Tokenizer()
    model = tiny_model(vocab_size=len(tokenizer))
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    memory = tmp_path / "memory.safetensors"
    common = ["generate", "--model", str(tmp_path / "model"), "--max-new-tokens", "4"]
    main([*common, "--prompt", "The first session.", "--save-memory", str(memory)])
    saved = memory.read_bytes()
    with pytest.raises((ValueError, SystemExit)):
        main([*common, "--prompt", "", "--load-memory", str(memory), "--save-memory", str(memory)])
    assert memory.read_bytes() == saved


@pytest.mark.parametrize("kwargs", [dict(num_beams=2), dict(do_sample=True, num_return_sequences=2)])
def test_several_sequences_per_row_are_refused_before_generating(kwargs):
    model = tiny_model()
    _, cache = generate_with_memory(model, torch.randint(1, 256, (1, 10)), None, max_new_tokens=3)
    name = next(iter(kwargs)) if "num_beams" in kwargs else "num_return_sequences"
    with pytest.raises(ValueError, match=name):
        generate_with_memory(model, torch.randint(1, 256, (1, 4)), cache, max_new_tokens=3, **kwargs)
    assert cache.get_seq_length() == 13  # nothing was read


def test_a_left_padded_batch_passes_its_mask_and_each_row_equals_the_row_alone(tmp_path):
    model = tiny_model()
    rows = [torch.randint(1, 256, (1, 14)), torch.randint(1, 256, (1, 9))]
    later = [torch.randint(1, 256, (2, 5)), torch.randint(1, 256, (2, 6))]
    padded = torch.zeros(2, 14, dtype=torch.long)
    mask = torch.zeros(2, 14, dtype=torch.long)
    for index, row in enumerate(rows):
        padded[index, 14 - row.shape[1] :], mask[index, 14 - row.shape[1] :] = row[0], 1
    kwargs = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False, repetition_penalty=2.0)
    replies, cache = generate_with_memory(model, padded, None, attention_mask=mask, **kwargs)
    alone = [generate_with_memory(model, row, None, **kwargs) for row in rows]
    for index in range(2):
        assert torch.equal(replies[index : index + 1], alone[index][0]), f"row {index}, turn 0"
    for turn, new in enumerate(later, start=1):
        if turn == 2:  # the padding goes through the file too
            save_memory(cache, tmp_path / "batch.safetensors", model)
            cache = load_memory(tmp_path / "batch.safetensors", model)
        replies, cache = generate_with_memory(model, new, cache, **kwargs)
        for index in range(2):
            expected, state = generate_with_memory(model, new[index : index + 1], alone[index][1], **kwargs)
            alone[index] = (expected, state)
            assert torch.equal(replies[index : index + 1], expected), f"row {index}, turn {turn}"
