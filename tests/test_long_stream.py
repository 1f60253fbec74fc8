"""Streams far longer than any training length: the cache stays bounded and the memory stays finite."""

import pytest
import torch
from transformers import DynamicCache

from .helpers import tiny_model

CHUNK = 8192


def stream(model, total_tokens):
    cache = DynamicCache(config=model.config)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for start in range(0, total_tokens, CHUNK):
            ids = torch.randint(1, 256, (1, min(CHUNK, total_tokens - start)), generator=generator)
            logits = model(ids, cache=cache, use_cache=True, logits_to_keep=1).logits
            assert torch.isfinite(logits).all(), f"non-finite logits after {start} tokens"
    return cache


def assert_memory_finite(cache):
    for layer in cache.layers:
        assert torch.isfinite(layer.recurrent_states[0]).all()
        assert torch.isfinite(layer.keys).all() and torch.isfinite(layer.values).all()


@pytest.mark.slow
def test_million_token_stream_stays_finite():
    model = tiny_model(sliding_window=64, memory_chunk_size=64)
    cache = stream(model, 1_000_000)
    assert cache.get_seq_length() == 1_000_000
    assert_memory_finite(cache)


@pytest.mark.slow
def test_bfloat16_model_stays_finite_over_100k_tokens():
    model = tiny_model(sliding_window=64, memory_chunk_size=64).to(torch.bfloat16)
    cache = stream(model, 100_000)
    assert cache.layers[0].recurrent_states[0].dtype == torch.float32
    assert_memory_finite(cache)


def test_short_stream_smoke():
    """The same path as the slow tests, at a length the default run affords."""
    cache = stream(tiny_model(sliding_window=64, memory_chunk_size=64), 3 * CHUNK // 2)
    assert cache.get_seq_length() == 3 * CHUNK // 2
    assert_memory_finite(cache)
