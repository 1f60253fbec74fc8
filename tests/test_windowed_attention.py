"""The blocked windowed attention equals plain softmax attention under the window mask, however it is blocked."""

import pytest
import torch
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.llama.modeling_llama import eager_attention_forward

from hf_llama_mem import windowed_attention as windowed_attention_module
from hf_llama_mem.windowed_attention import WindowView, windowed_attention

from .helpers import assert_close

WINDOW = 8
HEADS, KV_HEADS, DIM = 4, 2, 16


class Holder(torch.nn.Module):
    """The attributes the attention interfaces read from their module."""

    num_key_value_groups = HEADS // KV_HEADS
    is_causal = True


def reference(query, key, value, cached, key_valid):
    """Every query against every key, one mask: causal, within the window, no padding key but itself."""
    length, total = query.shape[2], key.shape[2]
    q_pos = torch.arange(cached, cached + length)[:, None]
    k_pos = torch.arange(total)[None, :]
    allowed = (k_pos <= q_pos) & (q_pos - k_pos < WINDOW)
    if key_valid is not None:
        allowed = allowed & (key_valid[:, None, None, :] | (k_pos == q_pos))
    groups = HEADS // KV_HEADS
    key, value = key.repeat_interleave(groups, 1), value.repeat_interleave(groups, 1)
    scores = (query @ key.transpose(-1, -2)) * DIM**-0.5
    weights = scores.masked_fill(~allowed, float("-inf")).softmax(-1)
    return (weights @ value).transpose(1, 2)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("cached", [0, 3, WINDOW - 1])
@pytest.mark.parametrize("padded", [False, True], ids=["unpadded", "padded"])
@pytest.mark.parametrize("query_block", [3, 5, 256])
def test_blocked_window_attention_equals_one_masked_softmax(monkeypatch, attn, cached, padded, query_block):
    monkeypatch.setattr(windowed_attention_module, "QUERY_BLOCK", query_block)
    monkeypatch.setattr(windowed_attention_module, "INFERENCE_QUERY_BLOCK", query_block)
    torch.manual_seed(0)
    length = 29  # several windows, blocks that do not divide it
    query = torch.randn(2, HEADS, length, DIM, requires_grad=True)
    key = torch.randn(2, KV_HEADS, cached + length, DIM, requires_grad=True)
    value = torch.randn(2, KV_HEADS, cached + length, DIM, requires_grad=True)
    key_valid = None
    if padded:
        key_valid = torch.ones(2, cached + length, dtype=torch.bool)
        key_valid[0, :6] = False
    token_valid = None if key_valid is None else key_valid[:, cached:]
    view = WindowView(WINDOW, cached, key_valid, token_valid, decoding=False, differentiable=True)
    inference_view = WindowView(WINDOW, cached, key_valid, token_valid, decoding=False, differentiable=False)
    interface = ALL_ATTENTION_FUNCTIONS["sdpa"] if attn == "sdpa" else eager_attention_forward
    out = windowed_attention(Holder(), interface, query, key, value, view, scaling=DIM**-0.5)
    expected = reference(query, key, value, cached, key_valid)
    assert_close(out, expected, 1e-5, "output")
    with torch.no_grad():  # the blocking without gradients
        assert_close(
            windowed_attention(Holder(), interface, query, key, value, inference_view, scaling=DIM**-0.5),
            expected,
            1e-5,
            "output without gradients",
        )
    weight = torch.randn_like(expected)
    grads = torch.autograd.grad((out * weight).sum(), (query, key, value))
    expected_grads = torch.autograd.grad((expected * weight).sum(), (query, key, value))
    for name, got, want in zip(("query", "key", "value"), grads, expected_grads, strict=True):
        assert_close(got, want, 1e-5, f"grad {name}")
