import pytest
import torch
from transformers import DynamicCache

from .helpers import assert_close, tiny_model

LENGTH = 90  # > 11 windows of W = 8, and several memory chunks of 16


def cache_bytes(cache) -> int:
    """Bytes of every tensor storage the cache holds (views count their whole storage)."""
    storages = {}
    for layer in cache.layers:
        tensors = [getattr(layer, "keys", None), getattr(layer, "values", None)]
        tensors += list(getattr(layer, "conv_states", {}).values()) + list(
            getattr(layer, "recurrent_states", {}).values()
        )
        for tensor in tensors:
            if isinstance(tensor, torch.Tensor):
                storages[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
    return sum(storages.values())


def incremental_logits(model, ids, splits, attention_mask=None, cache_keyword="cache"):
    """Prefill the pieces between `splits`, then decode token by token to the end, with one cache."""
    cache = DynamicCache(config=model.config)
    pieces, start = [], 0
    for end in [*splits, *range(splits[-1] + 1, ids.shape[1] + 1)]:
        mask = None if attention_mask is None else attention_mask[:, :end]
        out = model(ids[:, start:end], attention_mask=mask, use_cache=True, **{cache_keyword: cache})
        pieces.append(out.logits)
        start = end
    return torch.cat(pieces, dim=1), cache


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("rule", ["gated_delta", "delta"])
@pytest.mark.parametrize("splits", [[1], [7], [8], [33], [5, 40, 61]], ids=lambda s: "prefill" + "-".join(map(str, s)))
def test_forward_equals_prefill_plus_decode(attn, rule, splits):
    model = tiny_model(memory_rule=rule, attn_implementation=attn)
    ids = torch.randint(1, 256, (2, LENGTH))
    with torch.no_grad():
        full = model(ids).logits
        incremental, _ = incremental_logits(model, ids, splits)
    assert_close(incremental, full, 1e-4, "logits")


def test_decode_with_gradients_recorded_computes_the_same():
    """The decode step updates the memory in place; a forward that records gradients must still compute the same."""
    model = tiny_model()
    ids = torch.randint(1, 256, (1, 30))
    with torch.no_grad():
        expected, _ = incremental_logits(model, ids, [12])
    recorded, _ = incremental_logits(model, ids, [12])
    assert recorded.requires_grad
    assert_close(recorded, expected, 1e-6, "logits")


def test_both_cache_keywords_carry_the_memory():
    model = tiny_model()
    ids = torch.randint(1, 256, (1, 40))
    with torch.no_grad():
        full = model(ids).logits
        for keyword in ("cache", "past_key_values"):
            incremental, _ = incremental_logits(model, ids, [30], cache_keyword=keyword)
            assert_close(incremental, full, 1e-4, keyword)


@pytest.mark.parametrize("memory_layers", [None, [1], []], ids=["all", "one", "none"])
def test_left_padding_changes_nothing(memory_layers):
    model = tiny_model(memory_layers=memory_layers)
    ids = torch.randint(1, 256, (1, 50))
    pad = 13
    # random ids under the padding: the mask alone must make them invisible
    padded = torch.cat([torch.randint(1, 256, (1, pad)), ids], 1)
    batch = torch.cat([padded, torch.randint(1, 256, (1, 50 + pad))], 0)
    mask = torch.ones_like(batch)
    mask[0, :pad] = 0
    with torch.no_grad():
        alone = model(ids).logits
        together = model(batch, attention_mask=mask).logits[:1, pad:]
        without_cache = model(batch, attention_mask=mask, use_cache=False).logits[:1, pad:]  # as in training
        incremental, _ = incremental_logits(model, batch, [pad + 10], attention_mask=mask)
    assert_close(together, alone, 1e-4, "padded forward")
    assert_close(without_cache, alone, 1e-4, "padded forward without a cache")
    assert_close(incremental[:1, pad:], alone, 1e-4, "padded prefill + decode")


def test_cache_size_is_constant_in_context_length():
    model = tiny_model()
    sizes = {}
    with torch.no_grad():
        for windows in (3, 40):
            ids = torch.randint(1, 256, (2, windows * 8))
            _, cache = incremental_logits(model, ids, [windows * 8 - 3])
            sizes[windows] = cache_bytes(cache)
            assert cache.get_seq_length() == windows * 8
    assert sizes[3] == sizes[40] > 0


def test_long_prefill_is_not_pinned_by_the_cache():
    model = tiny_model()
    with torch.no_grad():
        short, long = (DynamicCache(config=model.config) for _ in range(2))
        model(torch.randint(1, 256, (1, 24)), cache=short, use_cache=True)
        model(torch.randint(1, 256, (1, 2000)), cache=long, use_cache=True)
    assert cache_bytes(long) == cache_bytes(short)


def test_memory_state_is_float32_in_a_bfloat16_model_and_holds_the_float32_values():
    model = tiny_model()
    ids = torch.randint(1, 256, (1, 30))
    caches = {}
    for dtype in (torch.float32, torch.bfloat16):
        caches[dtype] = DynamicCache(config=model.config)
        with torch.no_grad():
            model.to(dtype)(ids[:, :25], cache=caches[dtype], use_cache=True)
            for t in range(25, 30):  # and through decode steps
                model(ids[:, t : t + 1], cache=caches[dtype], use_cache=True)
    bf16_layers, fp32_layers = caches[torch.bfloat16].layers, caches[torch.float32].layers
    assert bf16_layers[0].keys.dtype == torch.bfloat16
    for layer, (got, expected) in enumerate(zip(bf16_layers, fp32_layers, strict=True)):
        assert got.recurrent_states[0].dtype == torch.float32
        # what the bf16 model's projections feed it is rounded to bf16; measured 0.004 at entries of size 0.3
        assert_close(got.recurrent_states[0], expected.recurrent_states[0], 1e-2, f"memory state, layer {layer}")


@pytest.mark.parametrize("explicit_positions", [False, True], ids=["positions-from-mask", "position-ids"])
@pytest.mark.parametrize("segment", [5, 16, 10_000])
def test_segmented_prefill_equals_one_pass(monkeypatch, segment, explicit_positions):
    """A long prefill without gradients runs through the cache in segments: the same logits, hidden states and cache
    as one pass over the whole input, with left padding too."""
    from hf_llama_mem import modeling_llama_mem

    model = tiny_model()
    ids = torch.randint(1, 256, (2, LENGTH))
    mask = torch.ones_like(ids)
    mask[0, :11] = 0
    positions = (mask.cumsum(-1) - 1).clamp(min=0) if explicit_positions else None
    results = {}
    for name, size in (("one pass", LENGTH + 1), ("segmented", segment)):
        monkeypatch.setattr(modeling_llama_mem, "PREFILL_SEGMENT", size)
        cache = DynamicCache(config=model.config)
        with torch.no_grad():
            out = model(
                ids,
                attention_mask=mask,
                position_ids=positions,
                use_cache=True,
                cache=cache,
                output_hidden_states=True,
            )
            after = model(ids[:, :3], attention_mask=torch.cat([mask, mask[:, :3]], 1), use_cache=True, cache=cache)
        results[name] = (out, after)
    (whole, whole_after), (pieces, pieces_after) = results["one pass"], results["segmented"]
    assert_close(pieces.logits, whole.logits, 1e-5, "logits")
    for layer, (a, b) in enumerate(zip(pieces.hidden_states, whole.hidden_states, strict=True)):
        assert_close(a, b, 1e-5, f"hidden states {layer}")
    assert_close(pieces_after.logits, whole_after.logits, 1e-5, "logits after the prefill, from the cache")
