import pytest
import torch
from transformers import DynamicCache

from .helpers import assert_close, tiny_model

LENGTH = 90  # > 11 windows of W = 8, and several memory chunks of 16


def cache_bytes(cache) -> int:
    """Bytes of every tensor storage the cache holds (views count their whole storage)."""
    storages = {}
    for layer in cache.layers:
        tensors = [getattr(layer, name, None) for name in ("keys", "values", "memory_entries")]
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


# ---- the cache layout and the caches forward accepts (issue 18, items 3, 4, 9, 10, 11, 12, 18) ----


def v_proj_outputs(model, calls) -> list[torch.Tensor]:
    """Runs `calls()` and returns, per layer, the v_proj outputs of every token it read, [B, Hkv, tokens, D]."""
    recorded = [[] for _ in model.model.layers]
    head_dim = model.config.head_dim
    hooks = [
        layer.self_attn.v_proj.register_forward_hook(
            lambda module, args, out, i=i: recorded[i].append(out.unflatten(-1, (-1, head_dim)).transpose(1, 2))
        )
        for i, layer in enumerate(model.model.layers)
    ]
    try:
        with torch.no_grad():
            calls()
    finally:
        for hook in hooks:
            hook.remove()
    return [torch.cat(values, dim=2) for values in recorded]


@pytest.mark.parametrize("decode_steps", [0, 3], ids=["after-prefill", "after-decode"])
def test_cache_layer_values_are_the_attention_values_of_the_last_window_tokens(decode_steps):
    """Code that reads a cache layer's `values` as attention values (KV quantization, compression tools) gets them:
    exactly the v_proj outputs (RoPE-free) of the last W - 1 tokens, in every layer. A memory layer keeps its tokens'
    memory entries (memory key, log decay, write strength) as its own state, float32, for the same tokens."""
    model = tiny_model(memory_layers=[1])
    config = model.config
    window, head_dim = config.sliding_window, config.head_dim
    ids = torch.randint(1, 256, (2, 30 + decode_steps))
    cache = DynamicCache(config=config)

    def calls():
        model(ids[:, :30], cache=cache, use_cache=True)
        for t in range(30, 30 + decode_steps):
            model(ids[:, t : t + 1], cache=cache, use_cache=True)

    values = v_proj_outputs(model, calls)
    for index, layer in enumerate(cache.layers):
        assert torch.equal(layer.values, values[index][:, :, -(window - 1) :]), f"layer {index}"
    assert getattr(cache.layers[0], "memory_entries", None) is None  # layer 0 has no memory
    entries = cache.layers[1].memory_entries
    assert entries.dtype == torch.float32
    assert entries.shape == (2, config.num_key_value_heads, window - 1, head_dim + 2)


def test_an_extreme_decay_stays_finite_in_float16():
    """float16 ends at 65504: a log decay below -65504 (a memory that learned to forget at once) became -inf when the
    window entries were cast to the model dtype, and the chunked op gave NaN. The decay and write strength are
    computed and kept in float32, so a float16 model computes what the float32 one does, to float16 rounding."""
    import copy
    import math

    model = tiny_model()
    with torch.no_grad():
        for layer in model.model.layers:  # log decay -4 softplus(30000 + ...), about -120000, for every token
            layer.self_attn.memory.decay_bias.fill_(30000.0)
            layer.self_attn.memory.decay_log_rate.fill_(math.log(4.0))
    model = copy.deepcopy(model).half().float()  # weights float16 holds exactly: only the arithmetic differs
    half = copy.deepcopy(model).half()
    ids = torch.randint(1, 256, (1, 40))
    with torch.no_grad():
        expected = model(ids).logits
        forward = half(ids).logits
        incremental, cache = incremental_logits(half, ids, [30])
    for name, logits in (("forward", forward), ("prefill + decode", incremental)):
        assert torch.isfinite(logits).all(), name
        # A memory that forgets at once holds one token, and the read norm scales that token's read to unit size
        # whatever its query-key product, so float16's rounding of q and k shows more than in an ordinary model:
        # measured up to 0.03 here, at logits up to 0.6 (0.001-0.004 with the initial decay).
        assert_close(logits.float(), expected, 5e-2, f"float16 {name} vs float32")
    head_dim = model.config.head_dim
    for layer in cache.layers:
        decay = layer.memory_entries[..., head_dim]
        assert layer.memory_entries.dtype == torch.float32 and torch.isfinite(decay).all()
        assert decay.max() < -65504  # what float16 cannot hold


def foreign_cache(prefilled: bool, **config):
    """A cache built (and, if `prefilled`, filled) for tiny_model(**config)."""
    other = tiny_model(**config)
    cache = DynamicCache(config=other.config)
    if prefilled:
        with torch.no_grad():
            other(torch.randint(1, 256, (1, 20)), cache=cache, use_cache=True)
    return cache


@pytest.mark.parametrize("prefilled", [False, True], ids=["empty", "prefilled"])
@pytest.mark.parametrize(
    "other, message",
    [
        (dict(sliding_window=16), "cache layer 0 has sliding_window=16, but this model's window is 8"),
        (dict(num_hidden_layers=3), "the cache has 3 layers, but this model has 2"),
        (dict(memory_layers=[1]), "cache layer 0 is a sliding-window layer without memory"),
    ],
    ids=["window", "layers", "memory-layers"],
)
def test_a_cache_built_for_another_configuration_is_refused_by_name(other, message, prefilled):
    model = tiny_model()
    cache = foreign_cache(prefilled, **other)
    with pytest.raises(ValueError) as error, torch.no_grad():
        model(torch.randint(1, 256, (1, 3)), cache=cache, use_cache=True)
    assert message in str(error.value)


def test_a_cache_of_another_architecture_is_refused_by_name():
    from transformers import LlamaConfig

    from .helpers import TINY_DIMS

    model = tiny_model()
    cache = DynamicCache(config=LlamaConfig(**TINY_DIMS))  # full attention
    with pytest.raises(ValueError, match="cache layer 0 is a full-attention layer"), torch.no_grad():
        model(torch.randint(1, 256, (1, 3)), cache=cache, use_cache=True)


def test_a_config_less_dynamic_cache_works_as_the_config_built_one():
    """`DynamicCache()` (transformers' standard idiom) gets the layers this model needs on first use."""
    model = tiny_model()
    ids = torch.randint(1, 256, (2, 40))
    results = []
    for cache in (DynamicCache(), DynamicCache(config=model.config)):
        with torch.no_grad():
            first = model(ids[:, :30], cache=cache, use_cache=True).logits
            steps = [model(ids[:, t : t + 1], cache=cache, use_cache=True).logits for t in range(30, 40)]
        results.append(torch.cat([first, *steps], dim=1))
        assert len(cache.layers) == model.config.num_hidden_layers
    assert torch.equal(results[0], results[1])


def test_a_static_cache_computes_what_the_dynamic_cache_computes_in_place():
    """A StaticCache gets fixed-shape layers: a left-padded prefill shorter than the window (empty slots), decode
    steps past the window, then a longer continuation give the dynamic cache's logits, and the decode steps write
    into the same tensors (what a CUDA graph of the step needs)."""
    from transformers import StaticCache

    from hf_llama_mem.fixed_cache import FixedWindowLayer, LlamaMemFixedLayer

    model = tiny_model(memory_layers=[1])
    ids = torch.randint(1, 256, (2, 30))
    mask = torch.ones_like(ids)
    mask[0, :2] = 0

    def run(cache, addresses=None):
        with torch.no_grad():
            logits = [model(ids[:, :3], attention_mask=mask[:, :3], cache=cache, use_cache=True).logits]
            for t in range(3, 20):
                logits.append(model(ids[:, t : t + 1], attention_mask=mask[:, : t + 1], cache=cache).logits)
                if addresses is not None:
                    addresses.add(tuple(t.data_ptr() for layer in cache.layers for t in tensors_of(layer)))
            logits.append(model(ids[:, 20:], attention_mask=mask, cache=cache, use_cache=True).logits)
        return torch.cat(logits, dim=1)

    def tensors_of(layer):
        return [layer.keys, layer.values, *getattr(layer, "row_states", list)(), layer.valid, layer.seen]

    static = StaticCache(config=model.config, max_cache_len=4)  # max_cache_len does not matter: W - 1 slots
    addresses = set()
    assert_close(run(static, addresses), run(DynamicCache(config=model.config)), 1e-5, "static vs dynamic")
    assert [type(layer) for layer in static.layers] == [FixedWindowLayer, LlamaMemFixedLayer]
    assert len(addresses) == 1, "a decode step replaced a tensor of the cache"
    assert static.get_seq_length() == 30 and static.layers[1].keys.shape[2] == model.config.sliding_window - 1


def test_batch_select_indices_keeps_exactly_the_selected_rows():
    """batch_repeat_interleave and batch_select_indices carry every state of a row: window, memory entries, key
    convolution state and memory matrix (a row selected back from repeated ones continues as the original does)."""
    model = tiny_model()
    ids = torch.randint(1, 256, (2, 30))
    original, repeated = (DynamicCache(config=model.config) for _ in range(2))
    with torch.no_grad():
        model(ids[:, :25], cache=original, use_cache=True)
        model(ids[:, :25], cache=repeated, use_cache=True)
        repeated.batch_repeat_interleave(3)
        assert model(ids[:, 25:26].repeat_interleave(3, 0), cache=repeated, use_cache=True).logits.shape[0] == 6
        repeated.batch_select_indices(torch.tensor([2, 5]))  # the last copy of each row
        expected = [model(ids[:, 25:26], cache=original, use_cache=True).logits]
        expected += [model(ids[:, t : t + 1], cache=original, use_cache=True).logits for t in range(26, 30)]
        got = [model(ids[:, t : t + 1], cache=repeated, use_cache=True).logits for t in range(26, 30)]
    assert_close(torch.cat(got, 1), torch.cat(expected[1:], 1), 1e-6, "selected rows")


def test_backward_through_a_prefill_and_cached_decode_steps_equals_one_forward():
    """A cached forward that records gradients (a prefill, then decode steps) backpropagates: the same gradients as
    one forward over the whole sequence."""
    model = tiny_model()
    ids = torch.randint(1, 256, (1, 30))
    weights = torch.randn(1, 30, model.config.vocab_size)
    parameters = [p for p in model.parameters() if p.requires_grad]
    expected = torch.autograd.grad((model(ids).logits * weights).sum(), parameters)
    logits, _ = incremental_logits(model, ids, [20])
    got = torch.autograd.grad((logits * weights).sum(), parameters)
    names = [name for name, p in model.named_parameters() if p.requires_grad]
    for name, a, b in zip(names, got, expected, strict=True):
        scale = b.abs().max().clamp_min(1.0)
        assert_close(a / scale, b / scale, 1e-5, f"gradient of {name}")
