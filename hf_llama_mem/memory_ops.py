"""The gated delta-rule memory op in two forms with one contract.

`recurrent_gated_delta_rule` is the spec: a plain loop over time in float32. `chunk_gated_delta_rule` computes the
same thing chunk by chunk (within-chunk triangular solves, between-chunk state passing), which is what training and
prefill use.

The chunked form, for one head and a chunk of C tokens that starts from state S (K x V). With d_i = g_1 + ... + g_i
(the log decay from the chunk start through token i), the recurrence is S_i = exp(g_i) S_{i-1} + k_i w_i^T, where
w_i = beta_i (v_i - exp(g_i) S_{i-1}^T k_i) is the delta rule's write. Unrolled,
    S_i = exp(d_i) S + sum_{j<=i} exp(d_i - d_j) k_j w_j^T,
so the writes solve a unit lower-triangular system, (I + A) w = beta v - beta exp(d) K S, with
A_ij = beta_i exp(d_i - d_j) (k_i . k_j) for j < i. One solve per chunk gives U = (I + A)^-1 beta V and
W = (I + A)^-1 beta exp(d) K, and then w = U - W S for any start state S. The outputs are
    o_i = exp(d_i) S^T q_i + sum_{j<=i} exp(d_i - d_j) (q_i . k_j) w_j,
and the end state exp(d_C) S + sum_j exp(d_C - d_j) k_j w_j^T is a linear map of S. Only that map is applied
sequentially across chunks; everything else is batched over all chunks at once.

Shape legend: B batch, T time, H key/value (memory) heads, HQ query heads (a multiple of H: a group of query heads
reads the same memory), K key dim, V value dim. Layouts follow flash-linear-attention and transformers:
q [B, T, HQ, K], k [B, T, H, K], v [B, T, H, V], g and beta [B, T, H], state [B, H, K, V].
"""

import torch
import torch.nn.functional as F

__all__ = ["chunk_gated_delta_rule", "recurrent_gated_delta_rule"]


def _op_settings(q, k, scale):
    """Query heads per memory head, the query scale and the compute dtype shared by both forms of the op."""
    num_q_heads, key_dim = q.shape[2:]
    num_heads = k.shape[2]
    if num_q_heads % num_heads != 0:
        raise ValueError(f"query heads ({num_q_heads}) must be a multiple of key heads ({num_heads})")
    scale = key_dim**-0.5 if scale is None else scale
    dtype = torch.promote_types(q.dtype, torch.float32)  # float32 at least; float64 stays float64 for gradcheck
    return num_q_heads // num_heads, scale, dtype


def _to_heads_first(q, k, v, g, beta, scale):
    """fp32, heads before time; the query heads get a group axis: q [B, H, G, T, K]."""
    batch, length, _, key_dim = q.shape
    num_groups, scale, dtype = _op_settings(q, k, scale)
    q = q.to(dtype).view(batch, length, k.shape[2], num_groups, key_dim).permute(0, 2, 3, 1, 4) * scale
    k, v, g, beta = (x.to(dtype).transpose(1, 2) for x in (k, v, g, beta))
    return q, k, v, g, beta


def _initial_state(initial_state, k, v):
    """The given start state in the compute dtype, or zeros [B, H, K, V]; k and v are heads-first [B, H, ..., D]."""
    if initial_state is None:
        return k.new_zeros(*k.shape[:2], k.shape[-1], v.shape[-1])
    return initial_state.to(k.dtype)


def recurrent_gated_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    g: torch.Tensor,
    beta: torch.Tensor,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Reference gated delta rule, one token at a time.

    For t = 1..T, per memory head, with S of shape [K, V] (S[:, j] is the value dim j read by a key):
        S <- exp(g_t) * S
        S <- S + beta_t * k_t (v_t - S^T k_t)^T
        o_t = S^T (scale * q_t)           (every query head of the group reads the same S)
    `g` is the log decay (<= 0; g = 0 is the plain delta rule), `beta` in [0, 1] the write strength; a token with
    beta = 0 and g = 0 leaves S exactly unchanged. Returns o [B, T, HQ, V] and, if asked, the final state
    [B, H, K, V], both in float32 whatever the input dtype (the state math always runs in float32).
    """
    batch, length, num_q_heads, _ = q.shape
    q, k, v, g, beta = _to_heads_first(q, k, v, g, beta, scale)
    state = _initial_state(initial_state, k, v)
    outputs = []
    for t in range(length):  # matmul rather than einsum: this loop is also the decode step, where overhead counts
        key = k[:, :, t, None, :]  # [B, H, 1, K]
        state = state * g[:, :, t, None, None].exp()
        correction = beta[:, :, t, None, None] * (v[:, :, t, None, :] - key @ state)  # [B, H, 1, V]
        state = state + key.transpose(-1, -2) @ correction
        outputs.append(q[:, :, :, t] @ state)  # [B, H, G, V]
    out = torch.stack(outputs, dim=3) if outputs else q.new_zeros(*q.shape[:-1], v.shape[-1])
    # [B, H, G, T, V] -> [B, T, HQ, V]
    out = out.permute(0, 3, 1, 2, 4).reshape(batch, length, num_q_heads, -1)
    return out, (state if output_final_state else None)


def chunk_gated_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    g: torch.Tensor,
    beta: torch.Tensor,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    chunk_size: int = 64,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Chunkwise-parallel gated delta rule: same contract and result as `recurrent_gated_delta_rule`."""
    batch, length, num_q_heads, key_dim = q.shape
    num_heads = k.shape[2]
    num_groups, scale, dtype = _op_settings(q, k, scale)
    # Padding is a run of no-op tokens (beta = 0, g = 0) at the end: it changes neither outputs nor state.
    pad = (-length) % chunk_size
    num_chunks = (length + pad) // chunk_size

    def to_chunks(x):  # [B, T, H, ...] -> [B, H, N, C, ...]
        x = F.pad(x.to(dtype), (0, 0) * (x.dim() - 2) + (0, pad))
        return x.unflatten(1, (num_chunks, chunk_size)).movedim(3, 1)

    k, v, g, beta = (to_chunks(x) for x in (k, v, g, beta))
    # Queries as rows (group, position) of each chunk: [B, H, N, G * C, K], so every product below is a plain
    # batched matmul (no broadcasting, which would copy its operands).
    q = to_chunks(q.unflatten(2, (num_heads, num_groups))).movedim(4, 3).flatten(3, 4)
    q = q.contiguous()
    state = _initial_state(initial_state, k, v)

    log_decay = g.cumsum(-1)  # [B, H, N, C]: log of the decay from the chunk start to (and including) each token
    causal = torch.ones(chunk_size, chunk_size, dtype=torch.bool, device=q.device).tril()
    # decay between tokens j <= i of a chunk; masked before exp so the upper triangle cannot overflow
    pair_decay = (log_decay[..., :, None] - log_decay[..., None, :]).masked_fill(~causal, float("-inf")).exp()

    # (I + A) [U | W] = [beta V | beta exp(d) K] (module docstring): the writes from a start state S are U - W S.
    k_beta = k * beta[..., None]
    system = torch.eye(chunk_size, dtype=k.dtype, device=q.device) + (k_beta @ k.transpose(-1, -2)) * pair_decay.tril(
        -1
    )
    rhs = torch.cat([v * beta[..., None], k_beta * log_decay.exp()[..., None]], dim=-1)
    solved = torch.linalg.solve_triangular(system, rhs, upper=False, unitriangular=True)
    values_part, keys_part = solved.split([v.shape[-1], k.shape[-1]], dim=-1)

    # Between chunks the state follows a linear recurrence S_{n+1} = M_n S_n + P_n with
    # M_n = decay_n I - K_n'^T W_n and P_n = K_n'^T U_n (K_n' the keys decayed to the chunk end). Everything but that
    # recurrence is batched over chunks, so the sequential loop is one small fused matmul per chunk.
    chunk_decay = log_decay[..., -1:]  # [B, H, N, 1]
    k_to_end_t = (k * (chunk_decay - log_decay).exp()[..., None]).transpose(-1, -2)  # [B, H, N, K, C]
    eye = torch.eye(key_dim, dtype=k.dtype, device=q.device)
    transitions = chunk_decay.exp()[..., None] * eye - k_to_end_t @ keys_part  # [B, H, N, K, K]
    inputs = k_to_end_t @ values_part  # [B, H, N, K, V]
    # Chunks are taken with unbind, not indexing: the backward of x[:, :, n] builds a zero tensor the size of all of x
    # for every chunk (quadratic in the number of chunks); unbind's backward stacks the gradients once.
    states = []
    for transition, written in zip(transitions.flatten(0, 1).unbind(1), inputs.flatten(0, 1).unbind(1), strict=True):
        states.append(state)
        state = torch.baddbmm(written, transition, state.flatten(0, 1)).view_as(state)
    starts = torch.stack(states, dim=2)  # [B, H, N, K, V]: the state at the start of each chunk

    # Output rows: the start state read by the decayed query, plus the chunk's own corrected writes.
    corrections = values_part - keys_part @ starts  # [B, H, N, C, V]
    scores = (q @ k.transpose(-1, -2)).unflatten(3, (num_groups, chunk_size)) * (pair_decay * scale)[:, :, :, None]
    row_decay = (log_decay.exp() * scale).repeat(1, 1, 1, num_groups)[..., None]  # [B, H, N, G * C, 1]
    out = (q @ starts) * row_decay + scores.flatten(3, 4) @ corrections  # [B, H, N, G * C, V]
    # [B, H, N, G, C, V] -> [B, N, C, H, G, V] -> [B, T, HQ, V]
    out = out.unflatten(3, (num_groups, chunk_size)).permute(0, 2, 4, 1, 3, 5)
    out = out.reshape(batch, -1, num_q_heads, v.shape[-1])
    return out[:, :length], (state if output_final_state else None)
