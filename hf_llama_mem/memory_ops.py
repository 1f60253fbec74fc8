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

The backward is written by hand (`_ChunkedRule`). It mirrors the forward: the gradient of each chunk's end state runs
back through the transposed state maps (the only sequential part), and then every other gradient is one batched
product per term, with the triangular solve's gradient one more solve with the transposed system. It keeps the
inputs, the chunk-start states, the per-chunk terms and the scores, less than autograd keeps for the same forward
(over the whole memory branch of the benchmark model, an 8K training step keeps 1.0 GB instead of 1.5 GB), and it
needs fewer full-size temporaries: on long inputs that memory traffic costs more than the arithmetic. Under
torch.compile the same forward and backward run as two opaque custom ops (`_chunked_rule_op`), which the compiler
calls as they are instead of unrolling them.

Shape legend: B batch, T time, H key/value (memory) heads, HQ query heads (a multiple of H: a group of query heads
reads the same memory), K key dim, V value dim. Layouts follow flash-linear-attention and transformers:
q [B, T, HQ, K], k [B, T, H, K], v [B, T, H, V], g and beta [B, T, H], state [B, H, K, V].
"""

import math
import re

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

__all__ = ["chunk_gated_delta_rule", "gated_delta_write", "gated_delta_write_", "recurrent_gated_delta_rule"]


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


def gated_delta_write(state, key, value, g, beta) -> torch.Tensor:
    """One token's write: S <- exp(g) S, then S <- S + beta k (v - S^T k)^T. state [B, H, K, V], key [B, H, K],
    value [B, H, V], g and beta [B, H]. The step of the reference recurrence (the model's decode step uses its
    in-place twin, `gated_delta_write_`)."""
    state = state * g[..., None, None].exp()
    correction = beta[..., None] * (value - (key[..., None, :] @ state)[..., 0, :])  # [B, H, V]
    return state + key[..., :, None] * correction[..., None, :]


def gated_delta_write_(state, key, value, g, beta) -> torch.Tensor:
    """`gated_delta_write` in place in `state` (contiguous), for a decode step: no new S and fewer small ops, which is
    what a decode step is bound by. key [B, H, K], value [B, H, V], g and beta [B, H] or [B, H, 1]. Returns `state`."""
    states = state.view(-1, *state.shape[-2:])  # [B H, K, V]
    keys = key.reshape(-1, 1, key.shape[-1])  # [B H, 1, K]
    decay = g.exp().reshape(-1, 1, 1)
    correction = torch.addcmul(value.reshape(-1, 1, value.shape[-1]), decay, torch.bmm(keys, states), value=-1)
    states.mul_(decay).baddbmm_(keys.transpose(1, 2), correction.mul_(beta.reshape(-1, 1, 1)))
    return state


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
    for t in range(length):
        state = gated_delta_write(state, k[:, :, t], v[:, :, t], g[:, :, t], beta[:, :, t])
        outputs.append(q[:, :, :, t] @ state)  # [B, H, G, V]
    out = torch.stack(outputs, dim=3) if outputs else q.new_zeros(*q.shape[:-1], v.shape[-1])
    # [B, H, G, T, V] -> [B, T, HQ, V]
    out = out.permute(0, 3, 1, 2, 4).reshape(batch, length, num_q_heads, v.shape[-1])
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
    num_heads = k.shape[2]
    num_groups, scale, dtype = _op_settings(q, k, scale)
    # Padding is a run of no-op tokens (beta = 0, g = 0) at the end: it changes neither outputs nor state.
    pad = (-length) % chunk_size
    num_chunks = (length + pad) // chunk_size

    def to_chunks(x):  # [B, T, H, ...] -> [B, H, N, C, ...]
        x = x.to(dtype)
        if pad:
            x = F.pad(x, (0, 0) * (x.dim() - 2) + (0, pad))
        return x.unflatten(1, (num_chunks, chunk_size)).movedim(3, 1)

    # Contiguous, so that every product below is a plain batched matmul over views.
    k, v, g, beta = (to_chunks(x).contiguous() for x in (k, v, g, beta))
    # Queries as rows (group, position) of each chunk: [B, H, N, G * C, K].
    q = to_chunks(q.unflatten(2, (num_heads, num_groups))).movedim(4, 3).flatten(3, 4)
    q = q * scale if scale != 1.0 else q.contiguous()
    out, final_state = _chunked_rule(q, k, v, g, beta, _initial_state(initial_state, k, v))
    # [B, H, N, G, C, V] -> [B, N, C, H, G, V] -> [B, T, HQ, V]
    out = out.unflatten(3, (num_groups, chunk_size)).permute(0, 2, 4, 1, 3, 5)
    out = out.reshape(batch, -1, num_q_heads, v.shape[-1])
    return out[:, :length], (final_state if output_final_state else None)


class _ChunkTerms:
    """What the chunks derive from k, v, g and beta alone (module docstring); every tensor is [B, H, N, ...]."""

    # What the backward needs of these, kept from the forward.
    KEPT = ("decay", "pair_decay", "k_beta", "key_products", "system", "solved", "to_end", "k_to_end", "transitions")

    def __init__(self, k, v, g, beta):
        chunk_size = k.shape[-2]
        log_decay = g.cumsum(-1)  # d [C]: the log decay from the chunk start through each token
        self.decay = log_decay.exp()
        causal = torch.ones(chunk_size, chunk_size, dtype=torch.bool, device=k.device).tril()
        # exp(d_i - d_j) for j <= i, else 0 [C, C]; masked before exp so that the upper triangle cannot overflow
        pair_log_decay = log_decay[..., :, None] - log_decay[..., None, :]
        self.pair_decay = pair_log_decay.masked_fill_(~causal, -math.inf).exp_()
        self.k_beta = k * beta[..., None]
        self.key_products = self.k_beta @ k.transpose(-1, -2)  # (beta_i k_i) . k_j [C, C]
        self.system = (self.key_products * self.pair_decay).tril_(-1)  # I + A [C, C]
        self.system.diagonal(dim1=-2, dim2=-1).add_(1.0)
        rhs = torch.cat([v * beta[..., None], self.k_beta * self.decay[..., None]], dim=-1)
        self.solved = torch.linalg.solve_triangular(self.system, rhs, upper=False, unitriangular=True)  # [U | W]
        self.to_end = (log_decay[..., -1:] - log_decay).exp()  # exp(d_C - d) [C]
        self.k_to_end = k * self.to_end[..., None]  # K', the keys decayed to the chunk end [C, K]
        # The state map between chunks: S_{n+1} = M S_n + K'^T U, with M = exp(d_C) I - K'^T W [K, K].
        self.transitions = -(self.k_to_end.transpose(-1, -2) @ self.keys_part)
        self.transitions.diagonal(dim1=-2, dim2=-1).add_(self.decay[..., -1:])

    def kept(self) -> tuple:
        return tuple(getattr(self, name) for name in self.KEPT)

    @classmethod
    def restore(cls, kept: tuple) -> "_ChunkTerms":
        terms = cls.__new__(cls)
        terms.__dict__.update(zip(cls.KEPT, kept, strict=True))
        return terms

    @property
    def values_part(self):  # U [C, V]
        return self.solved[..., : -self.k_beta.shape[-1]]

    @property
    def keys_part(self):  # W [C, K]
        return self.solved[..., -self.k_beta.shape[-1] :]

    def scores(self, q, k):
        """(q_i . k_j) exp(d_i - d_j) for j <= i, for every query row (group, position): [B, H, N, G * C, C]."""
        scores = q @ k.transpose(-1, -2)
        scores.unflatten(3, (-1, k.shape[-2])).mul_(self.pair_decay[:, :, :, None])
        return scores

    def row_decay(self, num_groups):
        """exp(d) for every query row: [B, H, N, G * C, 1]."""
        return self.decay.repeat(1, 1, 1, num_groups)[..., None]


def _linear_scan(transitions, inputs, state, reverse=False):
    """x_{n+1} = M_n x_n + P_n over the chunks n (reverse: over n = N-1..0, the x after a step is that of n - 1).

    transitions [B, H, N, K, K], inputs [B, H, N, K, V], state [B, H, K, V]. Returns the x that each step n starts
    from, [B, H, N, K, V], and the last x. The only sequential part of the op: one fused matmul per chunk.
    """
    # Chunks are taken with unbind, not indexing, which would copy a slice per step.
    steps = list(zip(transitions.flatten(0, 1).unbind(1), inputs.flatten(0, 1).unbind(1), strict=True))
    entered = [None] * len(steps)
    x = state.flatten(0, 1)
    for n in reversed(range(len(steps))) if reverse else range(len(steps)):
        entered[n] = x
        x = torch.baddbmm(steps[n][1], steps[n][0], x)
    starts = torch.stack(entered, dim=1).view_as(inputs) if entered else torch.empty_like(inputs)
    return starts, x.view_as(state)


def _chunked_forward(q, k, v, g, beta, state):
    """The chunked rule on chunk-major inputs: q [B, H, N, G * C, K] (scaled; rows are (group, position)),
    k [B, H, N, C, K], v [B, H, N, C, V], g and beta [B, H, N, C], state [B, H, K, V]. Returns the outputs
    [B, H, N, G * C, V], the final state, and what the backward needs beside q, k, v and beta (SAVED)."""
    terms = _ChunkTerms(k, v, g, beta)
    inputs = terms.k_to_end.transpose(-1, -2) @ terms.values_part  # K'^T U
    starts, final_state = _linear_scan(terms.transitions, inputs, state)
    # o = exp(d) S^T q + scores (U - W S) per chunk, S its start state (module docstring)
    corrections = terms.values_part - terms.keys_part @ starts
    out = (q @ starts).mul_(terms.row_decay(q.shape[-2] // k.shape[-2]))
    scores = terms.scores(q, k)
    out.view(-1, *out.shape[-2:]).baddbmm_(scores.flatten(0, 2), corrections.flatten(0, 2))
    return out, final_state, (starts, corrections, scores, *terms.kept())


# What `_chunked_forward` returns for the backward, after the inputs it also needs (q, k, v, beta).
SAVED = ("starts", "corrections", "scores", *_ChunkTerms.KEPT)


def _chunked_backward(q, k, v, beta, starts, corrections, scores, *kept, out_grad, final_grad):
    """The gradients of `_chunked_forward` for q, k, v, g, beta and the start state."""
    out_grad = out_grad.contiguous()
    num_groups = q.shape[-2] // k.shape[-2]
    terms = _ChunkTerms.restore(kept)
    row_decay = terms.row_decay(num_groups)
    decayed_q = q * row_decay

    # The gradient of each chunk's end state comes back through the transposed state map: the gradient of its
    # start state is M^T (end gradient) + (exp(d) q - scores W)^T (output gradient).
    scores_t_out_grad = scores.transpose(-1, -2) @ out_grad  # [C, V]
    residuals = decayed_q.transpose(-1, -2) @ out_grad - terms.keys_part.transpose(-1, -2) @ scores_t_out_grad
    end_grads, state_grad = _linear_scan(terms.transitions.transpose(-1, -2), residuals, final_grad, reverse=True)
    corrections_grad = terms.k_to_end @ end_grads + scores_t_out_grad

    # o = exp(d) S^T q + scores corrections
    out_state_grad = out_grad @ starts.transpose(-1, -2)  # [G * C, K]
    q_grad = out_state_grad * row_decay
    log_decay_grad = (out_state_grad * decayed_q).sum(-1).unflatten(-1, (num_groups, -1)).sum(-2)
    scores_grad = out_grad @ corrections.transpose(-1, -2)  # [G * C, C]
    # pair_grad collects (gradient of exp(d_i - d_j)) * exp(d_i - d_j), the part that reaches d_i and -d_j
    pair_grad = (scores_grad * scores).unflatten(3, (num_groups, -1)).sum(3)
    scores_grad.unflatten(3, (num_groups, -1)).mul_(terms.pair_decay[:, :, :, None])  # now of q_i . k_j
    q_grad += scores_grad @ k
    k_grad = scores_grad.transpose(-1, -2) @ q

    # S_{n+1} = exp(d_C) S_n + K'^T corrections, K' = exp(d_C - d) k
    k_to_end_grad = corrections @ end_grads.transpose(-1, -2)  # [C, K]
    to_end_grad = (k_to_end_grad * terms.k_to_end).sum(-1)
    chunk_end_grad = (starts * end_grads).sum((-2, -1)) * terms.decay[..., -1] + to_end_grad.sum(-1)
    log_decay_grad -= to_end_grad
    k_grad += k_to_end_grad * terms.to_end[..., None]

    # corrections = U - W S, and (I + A) [U | W] = [beta v | exp(d) beta k]
    solved_grad = torch.cat([corrections_grad, -(corrections_grad @ starts.transpose(-1, -2))], dim=-1)
    rhs_grad = torch.linalg.solve_triangular(
        terms.system.transpose(-1, -2), solved_grad, upper=True, unitriangular=True
    )
    system_grad = (rhs_grad @ terms.solved.transpose(-1, -2)).tril_(-1).neg_()  # of A (strictly lower)
    v_rhs_grad, k_rhs_grad = rhs_grad.split([v.shape[-1], k.shape[-1]], dim=-1)
    v_grad = v_rhs_grad * beta[..., None]
    beta_grad = (v_rhs_grad * v).sum(-1)
    k_beta_grad = k_rhs_grad * terms.decay[..., None]
    log_decay_grad += (k_beta_grad * terms.k_beta).sum(-1)
    # A = (beta k k^T) exp(d_i - d_j), strictly lower
    key_products_grad = system_grad * terms.pair_decay
    pair_grad += key_products_grad * terms.key_products
    k_beta_grad += key_products_grad @ k
    k_grad += key_products_grad.transpose(-1, -2) @ terms.k_beta
    k_grad += k_beta_grad * beta[..., None]
    beta_grad += (k_beta_grad * k).sum(-1)

    log_decay_grad += pair_grad.sum(-1) - pair_grad.sum(-2)
    log_decay_grad[..., -1] += chunk_end_grad
    g_grad = log_decay_grad.flip(-1).cumsum(-1).flip(-1)  # d = cumsum(g) within the chunk
    return q_grad, k_grad, v_grad, g_grad, beta_grad, state_grad


class _ChunkedRule(torch.autograd.Function):
    """`_chunked_forward` with its hand-written backward, for eager mode (`_chunked_rule_op` is its compiled twin)."""

    @staticmethod
    def forward(ctx, q, k, v, g, beta, state):
        out, final_state, saved = _chunked_forward(q, k, v, g, beta, state)
        ctx.save_for_backward(q, k, v, beta, *saved)
        return out, final_state

    @staticmethod
    @once_differentiable
    def backward(ctx, out_grad, final_grad):
        return _chunked_backward(*ctx.saved_tensors, out_grad=out_grad, final_grad=final_grad)


# Under torch.compile the rule is one opaque op with its backward another: traced, the scan over chunks and the
# chunk-major views of every term are unrolled into generated code, which inductor's CPU code generation spends
# minutes simplifying (its index expressions), for kernels (batched matmuls, a triangular solve) it runs as eager does.
# The ops are named after this module, so that a saved model's copy of it (trust_remote_code) registers its own.
OP_NAMESPACE = re.sub(r"\W", "_", __name__)


@torch.library.custom_op(f"{OP_NAMESPACE}::chunked_rule", mutates_args=())
def _chunked_rule_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor, state: torch.Tensor
) -> list[torch.Tensor]:
    """`_chunked_forward`: [out, final state, *SAVED], each a new contiguous tensor (an op's outputs may not alias
    its inputs, and the compiler assumes the layout `_chunked_rule_fake` gives)."""
    out, final_state, saved = _chunked_forward(q, k, v, g, beta, state)
    if not k.shape[2]:  # no chunk: the final state is the start state itself
        final_state = final_state.clone()
    return [tensor.contiguous() for tensor in (out, final_state, *saved)]


@_chunked_rule_op.register_fake
def _chunked_rule_fake(q, k, v, g, beta, state):
    batch, heads, chunks, rows, key_dim = q.shape
    size, value_dim = k.shape[-2], v.shape[-1]
    per_chunk = {  # the trailing dims of each output, after [B, H, N]
        "out": (rows, value_dim),
        "starts": (key_dim, value_dim),
        "corrections": (size, value_dim),
        "scores": (rows, size),
        "decay": (size,),
        "pair_decay": (size, size),
        "k_beta": (size, key_dim),
        "key_products": (size, size),
        "system": (size, size),
        "solved": (size, value_dim + key_dim),
        "to_end": (size,),
        "k_to_end": (size, key_dim),
        "transitions": (key_dim, key_dim),
    }
    chunked = {name: q.new_empty(batch, heads, chunks, *dims) for name, dims in per_chunk.items()}
    return [chunked["out"], state.new_empty(state.shape), *(chunked[name] for name in SAVED)]


@torch.library.custom_op(f"{OP_NAMESPACE}::chunked_rule_backward", mutates_args=())
def _chunked_rule_backward_op(
    saved: list[torch.Tensor], out_grad: torch.Tensor, final_grad: torch.Tensor
) -> list[torch.Tensor]:
    """`_chunked_backward` on (q, k, v, beta, *SAVED): the gradients of q, k, v, g, beta and the start state."""
    grads = list(_chunked_backward(*saved, out_grad=out_grad, final_grad=final_grad))
    if not saved[1].shape[2]:  # no chunk: the start state's gradient is the final state's itself
        grads[-1] = grads[-1].clone()
    return [grad.contiguous() for grad in grads]


@_chunked_rule_backward_op.register_fake
def _chunked_rule_backward_fake(saved, out_grad, final_grad):
    q, k, v, beta = saved[:4]
    # The gradients of q, k, v, g (shaped as beta), beta and the start state (shaped as the final state).
    return [tensor.new_empty(tensor.shape) for tensor in (q, k, v, beta, beta, final_grad)]


def _chunked_rule_setup_context(ctx, inputs, output):
    q, k, v, _, beta, _ = inputs
    ctx.save_for_backward(q, k, v, beta, *output[2:])


def _chunked_rule_backward_rule(ctx, grads):
    q, k, v = ctx.saved_tensors[:3]
    out_grad, final_grad = grads[:2]
    # An output that nothing used has no gradient; the backward takes zeros for it, as autograd.Function's do.
    if out_grad is None:
        out_grad = q.new_zeros(*q.shape[:-1], v.shape[-1])
    if final_grad is None:
        final_grad = q.new_zeros(*k.shape[:2], k.shape[-1], v.shape[-1])
    return tuple(_chunked_rule_backward_op(list(ctx.saved_tensors), out_grad, final_grad))


_chunked_rule_op.register_autograd(_chunked_rule_backward_rule, setup_context=_chunked_rule_setup_context)


def _chunked_rule(q, k, v, g, beta, state) -> tuple[torch.Tensor, torch.Tensor]:
    """The outputs and final state of the chunked rule: the autograd.Function in eager mode (no op dispatch to pay
    for), the opaque op under torch.compile."""
    if torch.compiler.is_compiling():
        out, final_state = _chunked_rule_op(q, k, v, g, beta, state)[:2]
        return out, final_state
    return _ChunkedRule.apply(q, k, v, g, beta, state)
