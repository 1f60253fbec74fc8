"""The gated delta-rule memory op in two forms with one contract.

`recurrent_gated_delta_rule` is the spec: a plain loop over time in float32. `chunk_gated_delta_rule` computes the
same thing chunk by chunk (within-chunk triangular solves, between-chunk state passing), which is what training and
prefill use. The derivation is in docs/memory_math.md.

Shape legend: B batch, T time, H key/value (memory) heads, HQ query heads (a multiple of H: a group of query heads
reads the same memory), K key dim, V value dim. Layouts follow flash-linear-attention and transformers:
q [B, T, HQ, K], k [B, T, H, K], v [B, T, H, V], g and beta [B, T, H], state [B, H, K, V].
"""

import torch
import torch.nn.functional as F

__all__ = ["chunk_gated_delta_rule", "recurrent_gated_delta_rule"]


def _to_heads_first(q, k, v, g, beta, scale):
    """fp32, heads before time; the query heads get a group axis: q [B, H, G, T, K]."""
    batch, length, num_q_heads, key_dim = q.shape
    num_heads = k.shape[2]
    if num_q_heads % num_heads != 0:
        raise ValueError(f"query heads ({num_q_heads}) must be a multiple of key heads ({num_heads})")
    scale = key_dim**-0.5 if scale is None else scale
    dtype = torch.promote_types(q.dtype, torch.float32)  # float32 at least; float64 stays float64 for gradcheck
    q = q.to(dtype).view(batch, length, num_heads, num_q_heads // num_heads, key_dim).permute(0, 2, 3, 1, 4) * scale
    k, v, g, beta = (x.to(dtype).transpose(1, 2) for x in (k, v, g, beta))
    return q, k, v, g, beta


def _initial_state(initial_state, k, v):
    batch, num_heads, _, key_dim = k.shape
    if initial_state is None:
        return k.new_zeros(batch, num_heads, key_dim, v.shape[-1])
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
    batch, length, num_q_heads, _ = q.shape
    q, k, v, g, beta = _to_heads_first(q, k, v, g, beta, scale)
    state = _initial_state(initial_state, k, v)
    # Padding is a run of no-op tokens (beta = 0, g = 0) at the end: it changes neither outputs nor state.
    pad = (-length) % chunk_size
    q = F.pad(q, (0, 0, 0, pad))
    k, v = (F.pad(x, (0, 0, 0, pad)) for x in (k, v))
    g, beta = (F.pad(x, (0, pad)) for x in (g, beta))
    num_chunks = (length + pad) // chunk_size

    # [B, H, N, C, D]; queries [B, H, N, G, C, K]
    k, v = (x.unflatten(2, (num_chunks, chunk_size)) for x in (k, v))
    q = q.unflatten(3, (num_chunks, chunk_size)).transpose(2, 3)
    g, beta = (x.unflatten(2, (num_chunks, chunk_size)) for x in (g, beta))

    log_decay = g.cumsum(-1)  # [B, H, N, C]: log of the decay from the chunk start to (and including) each token
    causal = torch.ones(chunk_size, chunk_size, dtype=torch.bool, device=q.device).tril()
    # decay between tokens j <= i of a chunk; masked before exp so the upper triangle cannot overflow
    pair_decay = (log_decay[..., :, None] - log_decay[..., None, :]).masked_fill(~causal, float("-inf")).exp()

    # UT transform: (I + A) U = beta * V - (beta * decay * K) S0, with A strictly lower triangular.
    k_beta = k * beta[..., None]
    system = torch.eye(chunk_size, dtype=k.dtype, device=q.device) + (k_beta @ k.transpose(-1, -2)) * pair_decay.tril(
        -1
    )
    rhs = torch.cat([v * beta[..., None], k_beta * log_decay.exp()[..., None]], dim=-1)
    solved = torch.linalg.solve_triangular(system, rhs, upper=False, unitriangular=True)
    values_part, keys_part = solved.split([v.shape[-1], k.shape[-1]], dim=-1)

    scores = (q @ k.transpose(-1, -2)[:, :, :, None]) * pair_decay[:, :, :, None]  # [B, H, N, G, C, C]
    q_decayed = q * log_decay.exp()[:, :, :, None, :, None]
    # The query group folds into the rows, so the loop below is plain batched matmuls with no broadcasting.
    num_groups = q.shape[3]
    scores, q_decayed = scores.flatten(3, 4), q_decayed.flatten(3, 4)  # [B, H, N, G * C, C] and [..., K]
    chunk_decay = log_decay[..., -1:]  # [B, H, N, 1]
    k_to_end = k * (chunk_decay - log_decay).exp()[..., None]

    # Chunks are taken with unbind, not indexing: the backward of x[:, :, n] builds a zero tensor the size of all of x
    # for every chunk (quadratic in the number of chunks); unbind's backward stacks the gradients once.
    per_chunk = zip(
        values_part.unbind(2),
        keys_part.unbind(2),
        q_decayed.unbind(2),
        scores.unbind(2),
        chunk_decay.exp().unbind(2),
        k_to_end.transpose(-1, -2).unbind(2),
        strict=True,
    )
    outputs = []
    for values_n, keys_n, q_n, scores_n, decay_n, k_to_end_n in per_chunk:
        new_values = values_n - keys_n @ state  # [B, H, C, V]
        outputs.append(q_n @ state + scores_n @ new_values)  # [B, H, G * C, V]
        state = state * decay_n[..., None] + k_to_end_n @ new_values
    out = torch.stack(outputs, dim=2).unflatten(3, (num_groups, chunk_size)).transpose(2, 3)  # [B, H, G, N, C, V]
    out = out.flatten(3, 4)[:, :, :, :length].permute(0, 3, 1, 2, 4).reshape(batch, length, num_q_heads, -1)
    return out, (state if output_final_state else None)
