"""The memory layer: its read norm, and the read at step t as the reference recurrence over the tokens j <= t - W."""

import torch
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from hf_llama_mem.memory_layer import L2_EPS, MemoryReadRMSNorm

from .helpers import assert_close


def test_read_norm_of_raw_query_equals_rms_norm_of_normalised_query_read():
    """The fused read norm equals the definition, RMSNorm(S^T (q / |q|)) * gate per head, in value and gradient
    (and without gradients, exactly its value with them); also for a query below the normalisation's floor."""
    fused, reference = MemoryReadRMSNorm(8, eps=0.5), LlamaRMSNorm(8, eps=0.5)  # an eps that matters
    with torch.no_grad():
        fused.weight.normal_()
        reference.weight.copy_(fused.weight)
    for query_size in (torch.rand(3, 5, 4, 1) * 10, torch.full((3, 5, 4, 1), L2_EPS / 4)):  # assorted norms; tiny
        state = torch.randn(3, 4, 8, 8, requires_grad=True)  # [B, H, K, V]
        query = (torch.nn.functional.normalize(torch.randn(3, 5, 4, 8), dim=-1) * query_size).requires_grad_()
        gate = torch.randn(4, requires_grad=True)
        read = torch.einsum("bthk,bhkv->bthv", query, state)
        unit_query = torch.nn.functional.normalize(query, dim=-1, eps=L2_EPS)
        out = fused(read, query, gate)
        expected = reference(torch.einsum("bthk,bhkv->bthv", unit_query, state)) * gate[:, None]
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
