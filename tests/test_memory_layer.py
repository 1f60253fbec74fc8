"""The memory layer: its read norm, and the read at step t as the reference recurrence over the tokens j <= t - W."""

import pytest
import torch
from transformers import DynamicCache
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from hf_llama_mem.memory_layer import L2_EPS, MemoryReadRMSNorm
from hf_llama_mem.memory_ops import gated_delta_write

from .helpers import assert_close, tiny_model


@pytest.mark.parametrize("gate_shape", [(4,), (3, 5, 4)], ids=["per_head", "per_token"])
def test_read_norm_of_raw_query_equals_rms_norm_of_normalised_query_read(gate_shape):
    """The fused read norm equals the definition, RMSNorm(S^T (q / |q|)) * gate, with a gate per head or per token
    and head (config.memory_token_gate), in value and gradient (and without gradients, exactly its value with them);
    also for a query below the normalisation's floor."""
    fused, reference = MemoryReadRMSNorm(8, eps=0.5), LlamaRMSNorm(8, eps=0.5)  # an eps that matters
    with torch.no_grad():
        fused.weight.normal_()
        reference.weight.copy_(fused.weight)
    for query_size in (torch.rand(3, 5, 4, 1) * 10, torch.full((3, 5, 4, 1), L2_EPS / 4)):  # assorted norms; tiny
        state = torch.randn(3, 4, 8, 8, requires_grad=True)  # [B, H, K, V]
        query = (torch.nn.functional.normalize(torch.randn(3, 5, 4, 8), dim=-1) * query_size).requires_grad_()
        gate = torch.randn(gate_shape, requires_grad=True)
        read = torch.einsum("bthk,bhkv->bthv", query, state)
        unit_query = torch.nn.functional.normalize(query, dim=-1, eps=L2_EPS)
        out = fused(read, query, gate)
        expected = reference(torch.einsum("bthk,bhkv->bthv", unit_query, state)) * gate[..., None]
        assert_close(out, expected, 1e-5, "read norm")
        with torch.no_grad():  # the path without an autograd Function: the same arithmetic
            assert torch.equal(fused(read, query, gate), out)
        weight = torch.randn_like(out)
        inputs = (query, state, gate)
        grads = torch.autograd.grad((out * weight).sum(), (*inputs, fused.weight))
        expected_grads = torch.autograd.grad((expected * weight).sum(), (*inputs, reference.weight))
        for name, got, want in zip(("query", "state", "gate", "weight"), grads, expected_grads, strict=True):
            size = want.abs().max().clamp_min(1.0)  # below the floor the query's gradient is ~1 / floor
            assert_close(got / size, want / size, 1e-5, f"grad {name}")


def recorded_memory_calls(model, forwards) -> list[dict]:
    """Runs `forwards()` and records, for every memory layer, the entries its tokens write (in token order) and, for
    every read, the pre-RoPE query and the result, concatenated over the calls."""
    memories = [layer.self_attn.memory for layer in model.model.layers]
    records = [{"entries": [], "queries": [], "reads": []} for _ in memories]

    def recorder(record):
        def hook(module, args, output):
            if args[0] == "write":
                record["entries"].append(output)
            else:
                record["queries"].append(args[2])  # ("read", hidden_states, query, ...)
                record["reads"].append(output)

        return hook

    handles = [
        memory.register_forward_hook(recorder(record)) for memory, record in zip(memories, records, strict=True)
    ]
    try:
        with torch.no_grad():
            forwards()
    finally:
        for handle in handles:
            handle.remove()
    return [
        {
            "entries": torch.cat(r["entries"], 2),
            "queries": torch.cat(r["queries"], 2),
            "reads": torch.cat(r["reads"], 1),
        }
        for r in records
    ]


def reference_reads(memory, entries, queries, real) -> torch.Tensor:
    """The specification, as a plain loop: token j (a real one) is written into S when it leaves the window, at step
    j + W, so the read at step t is gate * RMSNorm(S_t^T q_t / |q_t|) with S_t the gated delta rule over exactly the
    real tokens j <= t - W. entries [B, Hkv, >= T - W, 2D + 2] (value, memory key, g, beta of each token), queries
    [B, H, T, D], real [B, T] bool. Returns [B, T, H, D]."""
    batch, num_heads, length, head_dim = queries.shape
    num_kv_heads = entries.shape[1]
    value, key, g, beta = entries.float().split([head_dim, head_dim, 1, 1], dim=-1)
    norm = LlamaRMSNorm(head_dim, eps=memory.read_norm.eps)
    norm.weight.data.copy_(memory.read_norm.weight)
    state = torch.zeros(batch, num_kv_heads, head_dim, head_dim)
    reads = []
    for t in range(length):
        j = t - memory.window
        if j >= 0:
            written = gated_delta_write(state, key[:, :, j], value[:, :, j], g[:, :, j, 0], beta[:, :, j, 0])
            state = torch.where(real[:, j, None, None, None], written, state)
        unit_query = torch.nn.functional.normalize(queries[:, :, t].float(), dim=-1, eps=L2_EPS)
        grouped = unit_query.view(batch, num_kv_heads, num_heads // num_kv_heads, head_dim)
        reads.append(torch.einsum("bngk,bnkv->bngv", grouped, state).reshape(batch, num_heads, head_dim))
    return norm(torch.stack(reads, dim=1)) * memory.gate[:, None]


LENGTH = 45  # 5 windows of W = 8 and more than two memory chunks of 16


def one_forward(model, ids, mask):
    model(ids, attention_mask=mask)


def prefill_then_decode(model, ids, mask, prefill=19):
    """A prefill, then one token per call, through one cache."""
    cache = DynamicCache(config=model.config)
    for start, end in [(0, prefill), *((t, t + 1) for t in range(prefill, ids.shape[1]))]:
        model(ids[:, start:end], attention_mask=None if mask is None else mask[:, :end], cache=cache, use_cache=True)


@pytest.mark.parametrize("rule", ["gated_delta", "delta"])
@pytest.mark.parametrize("padded", [False, True], ids=["unpadded", "left-padded"])
@pytest.mark.parametrize("path", [one_forward, prefill_then_decode], ids=["forward", "prefill-decode"])
def test_read_at_step_t_is_the_recurrence_over_exactly_the_tokens_up_to_t_minus_w(rule, padded, path):
    model = tiny_model(memory_rule=rule)
    ids = torch.randint(1, 256, (2, LENGTH))
    real = torch.ones(2, LENGTH, dtype=torch.bool)
    if padded:
        real[0, :11] = False
    path_name = path.__name__
    records = recorded_memory_calls(model, lambda: path(model, ids, real.long() if padded else None))
    for layer, record in enumerate(records):
        memory = model.model.layers[layer].self_attn.memory
        expected = reference_reads(memory, record["entries"], record["queries"], real)
        # Padded steps' reads are never used (their outputs are discarded): the spec holds for the real ones.
        got, expected = record["reads"][real], expected[real]
        assert_close(got, expected, 1e-5, f"{path_name}, layer {layer}")
