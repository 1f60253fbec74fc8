import pytest
import torch
import torch.nn.functional as F

from hf_llama_mem.memory_ops import (
    chunk_gated_delta_rule,
    gated_delta_write,
    gated_delta_write_,
    recurrent_gated_delta_rule,
)

from .helpers import assert_close

CHUNK = 16


def make_inputs(length, heads=2, groups=2, key_dim=8, value_dim=6, gated=True, dtype=torch.float32, batch=2):
    q = F.normalize(torch.randn(batch, length, heads * groups, key_dim, dtype=dtype), dim=-1)
    k = F.normalize(torch.randn(batch, length, heads, key_dim, dtype=dtype), dim=-1)
    v = torch.randn(batch, length, heads, value_dim, dtype=dtype)
    g = (
        -torch.rand(batch, length, heads, dtype=dtype) * 0.3
        if gated
        else torch.zeros(batch, length, heads, dtype=dtype)
    )
    beta = torch.rand(batch, length, heads, dtype=dtype)
    h0 = torch.randn(batch, heads, key_dim, value_dim, dtype=dtype)
    return [x.requires_grad_() for x in (q, k, v, g, beta, h0)]


def run(op, q, k, v, g, beta, h0, **kwargs):
    return op(q, k, v, g=g, beta=beta, initial_state=h0, output_final_state=True, **kwargs)


@pytest.mark.parametrize("length", [1, CHUNK - 1, CHUNK + 1, 3 * CHUNK + 5], ids=lambda n: f"T{n}")
@pytest.mark.parametrize("gated", [True, False], ids=["gated_delta", "delta"])
@pytest.mark.parametrize("with_h0", [True, False], ids=["h0", "no-h0"])
def test_chunked_equals_recurrence_values_states_and_grads(length, gated, with_h0):
    q, k, v, g, beta, h0 = make_inputs(length, gated=gated)
    inputs = [q, k, v, g, beta, h0]
    initial = h0 if with_h0 else None
    o_ref, s_ref = run(recurrent_gated_delta_rule, q, k, v, g, beta, initial)
    o_chk, s_chk = run(chunk_gated_delta_rule, q, k, v, g, beta, initial, chunk_size=CHUNK)
    assert_close(o_chk, o_ref, 1e-5, "output")
    assert_close(s_chk, s_ref, 1e-5, "final state")
    weight_o, weight_s = torch.randn_like(o_ref), torch.randn_like(s_ref)
    wanted = inputs if with_h0 else inputs[:-1]
    grads_ref = torch.autograd.grad((o_ref * weight_o).sum() + (s_ref * weight_s).sum(), wanted)
    grads_chk = torch.autograd.grad((o_chk * weight_o).sum() + (s_chk * weight_s).sum(), wanted)
    for name, a, b in zip("q k v g beta h0".split()[: len(wanted)], grads_chk, grads_ref, strict=True):
        assert_close(a, b, 1e-4, f"grad {name}")


@pytest.mark.parametrize("chunk_size", [1, 4, 16, 64])
def test_result_does_not_depend_on_chunk_size(chunk_size):
    q, k, v, g, beta, h0 = make_inputs(50)
    o_ref, s_ref = run(chunk_gated_delta_rule, q, k, v, g, beta, h0, chunk_size=8)
    o, s = run(chunk_gated_delta_rule, q, k, v, g, beta, h0, chunk_size=chunk_size)
    assert_close(o, o_ref, 1e-5, "output")
    assert_close(s, s_ref, 1e-5, "state")


def test_two_calls_with_carried_state_equal_one_call():
    q, k, v, g, beta, h0 = make_inputs(70)
    o_all, s_all = run(chunk_gated_delta_rule, q, k, v, g, beta, h0, chunk_size=CHUNK)
    o1, s1 = run(
        chunk_gated_delta_rule, q[:, :33], k[:, :33], v[:, :33], g[:, :33], beta[:, :33], h0, chunk_size=CHUNK
    )
    o2, s2 = run(
        chunk_gated_delta_rule, q[:, 33:], k[:, 33:], v[:, 33:], g[:, 33:], beta[:, 33:], s1, chunk_size=CHUNK
    )
    assert_close(torch.cat([o1, o2], 1), o_all, 1e-5, "output")
    assert_close(s2, s_all, 1e-5, "state")


def test_no_op_tokens_leave_state_exactly_unchanged():
    q, k, v, g, beta, h0 = make_inputs(20)
    with torch.no_grad():
        for op, kwargs in ((recurrent_gated_delta_rule, {}), (chunk_gated_delta_rule, {"chunk_size": CHUNK})):
            _, state = run(op, q, k, v, torch.zeros_like(g), torch.zeros_like(beta), h0, **kwargs)
            assert torch.equal(state, h0) if op is recurrent_gated_delta_rule else torch.allclose(state, h0, atol=1e-6)


def test_full_write_with_unit_key_stores_the_value():
    """beta = 1, g = 0 and a unit key: reading with that key returns exactly the written value (delta rule)."""
    q, k, v, g, beta, h0 = make_inputs(1, groups=1)
    with torch.no_grad():
        out, _ = recurrent_gated_delta_rule(
            k, k, v, g=torch.zeros_like(g), beta=torch.ones_like(beta), initial_state=h0, scale=1.0
        )
    assert_close(out, v, 1e-5, "read-back")


@pytest.mark.parametrize("op", [recurrent_gated_delta_rule, chunk_gated_delta_rule])
def test_bf16_inputs_give_the_float32_result_of_the_same_values(op):
    """The state math runs in float32 whatever the input dtype: bf16 inputs give, in float32, what the recurrence
    gives on the same values in float32 (so nothing is rounded to bf16 on the way)."""
    inputs = make_inputs(40, dtype=torch.bfloat16)
    kwargs = {"chunk_size": CHUNK} if op is chunk_gated_delta_rule else {}
    with torch.no_grad():
        out, state = run(op, *inputs[:5], inputs[5], **kwargs)
        expected_out, expected_state = run(recurrent_gated_delta_rule, *(x.float() for x in inputs))
    assert out.dtype == torch.float32 and state.dtype == torch.float32
    assert_close(out, expected_out, 1e-5, "output")
    assert_close(state, expected_state, 1e-5, "state")


def test_gradcheck_float64():
    q, k, v, g, beta, h0 = make_inputs(7, heads=1, groups=2, key_dim=3, value_dim=2, dtype=torch.float64, batch=1)

    def chunked(*args):
        return run(chunk_gated_delta_rule, *args, chunk_size=4)

    assert torch.autograd.gradcheck(chunked, (q, k, v, g, beta, h0), eps=1e-6, atol=1e-5)


def test_query_heads_must_be_a_multiple_of_key_heads():
    q, k, v, g, beta, _ = make_inputs(4, heads=2, groups=1)
    with pytest.raises(ValueError, match="multiple of key heads"):
        chunk_gated_delta_rule(q[:, :, :1].expand(-1, -1, 3, -1), k, v, g=g, beta=beta)


@pytest.mark.parametrize("op", [recurrent_gated_delta_rule, chunk_gated_delta_rule])
def test_empty_input_gives_empty_output_and_the_initial_state(op):
    q, k, v, g, beta, h0 = make_inputs(0)
    out, state = run(op, q, k, v, g, beta, h0)
    assert out.shape == (2, 0, 4, 6) and torch.equal(state, h0)


def test_in_place_write_equals_the_reference_step():
    """The decode step's in-place write (on the cache's S) equals the reference recurrence's step."""
    torch.manual_seed(0)
    state = torch.randn(3, 2, 8, 8)
    key = F.normalize(torch.randn(3, 2, 8), dim=-1)
    value, g, beta = torch.randn(3, 2, 8), -torch.rand(3, 2), torch.rand(3, 2)
    expected = gated_delta_write(state, key, value, g, beta)
    written = state.clone()
    assert gated_delta_write_(written, key, value, g[..., None], beta[..., None]) is written
    assert_close(written, expected, 1e-6, "state")
