"""The memory reader of one layer: the entries each token writes when it leaves the window, and the normed read.

`LlamaMemMemory` feeds the gated delta-rule op (memory_ops.py) and keeps its state in the cache; `MemoryReadRMSNorm`
is the RMS norm of the read with its backward written out; `KeyConvolution` is the memory key's causal convolution.
"""

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from .configuration_llama_mem import LlamaMemConfig
from .memory_ops import chunk_gated_delta_rule, gated_delta_write, gated_delta_write_
from .windowed_attention import WindowView

__all__ = ["L2_EPS", "KeyConvolution", "LlamaMemMemory", "LowRankCorrection", "MemoryReadRMSNorm", "l2_normalize"]

# The floor of the query norm in the L2 normalisation of memory queries and keys (F.normalize's eps).
L2_EPS = 1e-6


def l2_normalize(x: torch.Tensor) -> torch.Tensor:
    """L2 normalisation over the last dim in float32 (the convention of the delta-rule kernels): F.normalize's
    arithmetic, without the Python layers of F.normalize and Tensor.norm, which cost more than it in a decode step."""
    x = x.float()
    return x / torch.linalg.vector_norm(x, dim=-1, keepdim=True).clamp_min(L2_EPS)


class MemoryReadRMSNorm(nn.Module):
    """RMS norm of a memory read by an L2-normalised query, times the learned per-head gate.

    It takes the read of the raw query: the read is linear in its query, so with r = S^T q,
    RMSNorm(S^T q / |q|) = r / sqrt(mean(r^2) + eps |q|^2) exactly. That is a few passes over the read instead of a
    normalisation of every query on top of the norm (this branch is bandwidth-bound on long inputs), and the backward
    is written out (`_ReadNorm`) for the same reason.
    """

    def __init__(self, head_dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(head_dim))
        self.eps = eps

    def forward(
        self, read: torch.Tensor, query: torch.Tensor, gate: torch.Tensor, differentiable: bool = True
    ) -> torch.Tensor:
        """read, query [B, T, H, D] float32; gate [H] (per head) or [B, T, H] (per token and head, float32).
        `differentiable`: the forward records gradients."""
        if differentiable:
            return _ReadNorm.apply(read, query, self.weight, gate, self.eps)
        # Nothing to differentiate (prefill, decode): the same arithmetic without an autograd Function's overhead,
        # which in a decode step costs more than the arithmetic.
        return read_norm_forward(read, query, self.weight, gate, self.eps)[0]


def read_norm_forward(read, query, weight, gate, eps) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """out = r * s * (weight gate) with s = (mean(r^2) + eps max(|q|^2, L2_EPS^2))^-1/2, per row of [B, T, H, D];
    gate [H] or [B, T, H]. Returns out, s and where |q|^2 was above the floor (what the backward needs)."""
    # Norms as reductions and products in place: on long inputs every full-size temporary costs.
    query_norm_sq = torch.linalg.vector_norm(query, dim=-1, keepdim=True).square_()
    unclamped = query_norm_sq > L2_EPS**2
    read_mean_sq = torch.linalg.vector_norm(read, dim=-1, keepdim=True).square_().div_(read.shape[-1])
    scale = read_mean_sq.add_(query_norm_sq.clamp_min_(L2_EPS**2), alpha=eps).rsqrt_()
    return (read * scale).mul_(weight * gate[..., None]), scale, unclamped


class _ReadNorm(torch.autograd.Function):
    """`read_norm_forward` with its backward written out."""

    @staticmethod
    def forward(ctx, read, query, weight, gate, eps):
        out, scale, unclamped = read_norm_forward(read, query, weight, gate, eps)
        ctx.save_for_backward(read, query, weight, gate, scale, unclamped)
        ctx.eps = eps
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, out_grad):
        read, query, weight, gate, scale, unclamped = ctx.saved_tensors
        per_channel = (out_grad * read).mul_(scale)
        weighted_grad = out_grad * (weight * gate[..., None])
        # d loss / d (mean(r^2) + eps |q|^2), through s = x^-1/2
        norm_grad = (weighted_grad * read).sum(-1, keepdim=True).mul_(scale.pow(3)).mul_(-0.5)
        read_grad = weighted_grad.mul_(scale).addcmul_(read, norm_grad, value=2.0 / read.shape[-1])
        query_grad = query * (norm_grad * unclamped).mul_(2.0 * ctx.eps)
        if gate.dim() == 1:  # one gate per head: reduce over the tokens first, the cheaper order
            per_channel = per_channel.sum((0, 1))  # [H, D]
            weight_grad = (per_channel * gate[:, None]).sum(0)
            gate_grad = (per_channel * weight).sum(-1)
        else:  # a gate per token and head [B, T, H]
            weight_grad = (per_channel * gate[..., None]).flatten(0, 2).sum(0)
            gate_grad = (per_channel * weight).sum(-1)
        return read_grad, query_grad, weight_grad, gate_grad, None


class KeyConvolution(nn.Conv1d):
    """The causal depthwise convolution of the memory key, over inputs already front-padded with the previous taps.

    In a decode step (one new position) a weighted sum of the taps beats a convolution call. Both run inside this
    module's forward, because accelerate's offloading loads a module's weights in a hook around its forward: a weight
    read outside it is a meta tensor there."""

    def forward(self, padded: torch.Tensor, decoding: bool = False) -> torch.Tensor:
        """padded [B, C, taps + T] -> [B, C, T]. `decoding`: WindowView.decoding (T = 1)."""
        if decoding:
            windows = padded.unfold(-1, self.kernel_size[0], 1)  # [B, C, T, taps + 1]
            return (windows * self.weight).sum(-1)  # weight [C, 1, taps + 1]
        return super().forward(padded)


class LowRankCorrection(nn.Module):
    """up @ down @ hidden_states, added to the attention's pre-RoPE query or key to give the memory its own.

    `up` starts at zero (as LoRA's B), so the memory starts from the attention's projections and a conversion stays
    exact; `down` starts as LoRA's A (the model's `_init_weights`). Why: the attention's q and k were trained for
    softmax over rotated positions, and a retrieval from a linear memory needs keys that stay apart over thousands of
    writes. Plain parameters rather than nn.Linear, so that transformers' Linear init never touches them."""

    def __init__(self, hidden_size: int, rank: int, num_heads: int, head_dim: int):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, head_dim
        self.down = nn.Parameter(torch.empty(rank, hidden_size))
        self.up = nn.Parameter(torch.zeros(num_heads * head_dim, rank))

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """hidden_states [B, T, hidden] -> [B, heads, T, D], the layout of the attention's query and key."""
        batch, length, _ = hidden_states.shape
        correction = F.linear(F.linear(hidden_states, self.down), self.up)
        return correction.view(batch, length, self.num_heads, self.head_dim).transpose(1, 2)


def keep_memory_state(layer_cache, state: torch.Tensor, differentiable: bool) -> torch.Tensor:
    """Store S in the cache layer. The cache copies into the tensor it holds, in place; a forward that records
    gradients (`differentiable`) hands over the new tensor instead, since an earlier step's backward may still need
    the values the old one holds (a decode step's read saves S)."""
    if differentiable and layer_cache.is_recurrent_states_initialized[0]:
        layer_cache.recurrent_states[0] = state
        return state
    return layer_cache.update_recurrent_state(state)


class LlamaMemMemory(nn.Module):
    """The memory reader of one layer: what each token writes when it leaves the window, and the read.

    Per kv head: the memory key is a causal depthwise convolution of the pre-RoPE key (so a token's memory key
    carries its predecessors, the associative-recall circuit), L2-normalised; the value is the attention value;
    decay exp(g) and write strength beta come from the token's hidden state. Every query head reads its kv head's
    S with its pre-RoPE, L2-normalised query; the read is RMS-normalised and scaled by a learned per-head gate.
    """

    def __init__(self, config: LlamaMemConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.window = config.sliding_window
        self.chunk_size = config.memory_chunk_size
        self.head_dim = config.head_dim
        self.num_key_value_heads = config.num_key_value_heads
        self.gated = config.memory_rule == "gated_delta"
        channels = config.num_key_value_heads * config.head_dim
        self.key_conv = KeyConvolution(channels, channels, config.memory_conv_size, groups=channels, bias=False)
        if self.gated:
            self.decay_proj = nn.Linear(config.hidden_size, config.num_key_value_heads, bias=False)
            self.decay_bias = nn.Parameter(torch.zeros(config.num_key_value_heads))
            self.decay_log_rate = nn.Parameter(torch.zeros(config.num_key_value_heads))
        self.write_proj = nn.Linear(config.hidden_size, config.num_key_value_heads, bias=True)
        self.read_norm = MemoryReadRMSNorm(config.head_dim, eps=config.rms_norm_eps)
        self.gate = nn.Parameter(torch.ones(config.num_attention_heads))
        self.query_correction = self.key_correction = None
        if config.memory_projection_rank:
            rank, hidden = config.memory_projection_rank, config.hidden_size
            self.query_correction = LowRankCorrection(hidden, rank, config.num_attention_heads, config.head_dim)
            self.key_correction = LowRankCorrection(hidden, rank, config.num_key_value_heads, config.head_dim)
        self.key_offset = self.query_offset = None
        if config.memory_centering:  # [heads, D]: zero at the start; see LlamaMemConfig.memory_centering
            self.key_offset = nn.Parameter(torch.zeros(config.num_key_value_heads, config.head_dim))
            self.query_offset = nn.Parameter(torch.zeros(config.num_attention_heads, config.head_dim))
        self.token_gate = None
        if config.memory_token_gate:  # [heads, hidden]: zero at the start; see LlamaMemConfig.memory_token_gate
            self.token_gate = nn.Parameter(torch.zeros(config.num_attention_heads, config.hidden_size))

    def forward(self, step: str, *args) -> torch.Tensor:
        """`step` "write" runs `entries(*args)`, "read" runs `read(*args)`. Both go through forward because module
        hooks only see forward calls: accelerate's offloading moves this module's own parameters (gate, decay) onto
        the execution device in a hook, and would otherwise leave them on disk."""
        if step == "write":
            return self.entries(*args)
        if step == "read":
            return self.read(*args)
        raise ValueError(f"step must be 'write' or 'read', got {step!r}.")

    def entries(self, hidden_states, key, value, view: WindowView, layer_cache) -> torch.Tensor:
        """What this call's tokens will write when they leave the window: [value | memory key | g | beta],
        [B, Hkv, T', 2D + 2] in float32 (a log decay g can lie below float16's range). With a cache every token will
        (the cache keeps the value in its window values and the rest in its memory entries until the token leaves);
        without one only the first T' = T - W do, and only theirs are computed.

        hidden_states [B, T, hidden]; key (pre-RoPE), value [B, Hkv, T, D]. Padded tokens write nothing.
        """
        token_valid = view.token_valid
        if layer_cache is None and hidden_states.shape[1] > self.window:
            leaving = hidden_states.shape[1] - self.window
            hidden_states, key, value = hidden_states[:, :leaving], key[:, :, :leaving], value[:, :, :leaving]
            token_valid = None if token_valid is None else token_valid[:, :leaving]
        if self.key_correction is not None:
            key = key + self.key_correction(hidden_states)
        batch, num_heads, length, head_dim = key.shape
        if token_valid is not None:
            key = key * token_valid[:, None, :, None]
        conv_input = key.permute(0, 1, 3, 2).reshape(batch, num_heads * head_dim, length)  # [B, C, T]
        taps = self.key_conv.kernel_size[0] - 1
        has_previous = layer_cache is not None and taps > 0 and layer_cache.has_previous_state[0]
        previous = (
            layer_cache.conv_states[0] if has_previous else conv_input.new_zeros(batch, conv_input.shape[1], taps)
        )
        padded = torch.cat([previous, conv_input], dim=-1)
        memory_key = self.key_conv(padded, view.decoding)
        if layer_cache is not None and taps > 0:
            # after the convolution: the cache overwrites its conv state in place
            layer_cache.update_conv_state(conv_input, conv_kernel_size=taps)
        memory_key = memory_key.view(batch, num_heads, head_dim, length).transpose(2, 3)
        if self.key_offset is not None:
            memory_key = memory_key + self.key_offset[:, None]
        memory_key = l2_normalize(memory_key)

        beta = torch.sigmoid(self.write_proj(hidden_states).float())
        if self.gated:
            # in float32 from the parameters on: e^decay_log_rate alone can pass float16's 65504
            rate = self.decay_log_rate.float().exp()
            g = -rate * F.softplus(self.decay_proj(hidden_states).float() + self.decay_bias.float())
        else:
            g = torch.zeros_like(beta)
        if token_valid is not None:
            beta, g = beta * token_valid[..., None], g * token_valid[..., None]
        scalars = torch.stack([g, beta], dim=-1).transpose(1, 2)  # [B, Hkv, T, 2]
        return torch.cat([value.float(), memory_key, scalars], dim=-1)

    def read(self, hidden_states, query, window_values, window_entries, view: WindowView, layer_cache) -> torch.Tensor:
        """Memory read for every query: [B, T, H, D] in float32, normed and gated.

        hidden_states [B, T, hidden]; query: pre-RoPE [B, H, T, D]. window_values [B, Hkv, N, D] and window_entries [B,
        Hkv, N, D + 2] (memory key, g, beta; float32): the values and memory entries of the cached window followed by
        this call's tokens (without a cache, at least the first T - W of them: only those leave the window). The read
        at step t sees exactly the tokens j <= t - W: in the stream of tokens leaving the window, front-padded with
        no-op writes, the read at t comes after the writes of the t + 1 entries before it.
        """
        if self.query_correction is not None:
            query = query + self.query_correction(hidden_states)
        if self.query_offset is not None:
            query = query + self.query_offset[:, None]
        length = query.shape[2]
        state = None
        if layer_cache is not None and layer_cache.is_recurrent_states_initialized[0]:
            state = layer_cache.recurrent_states[0]
        if view.decoding:
            return self.decode_read(hidden_states, query, window_values, window_entries, view, layer_cache, state)
        # With a cache the final state must include the token that leaves at the last step: one more stream entry,
        # read by a zero query.
        stream_length = length + (layer_cache is not None)
        no_ops = min(self.window - view.cached, stream_length)
        leaving = stream_length - no_ops
        value = window_values[:, :, :leaving].transpose(1, 2)
        entries = window_entries[:, :, :leaving].transpose(1, 2)
        # The query's L2 normalisation is folded into the read norm (MemoryReadRMSNorm).
        memory_query = query.transpose(1, 2).float()
        # Until the first write the memory is empty and every read is exactly zero (and depends on nothing): the op
        # and the norm start at the first write, which on a fresh input of 2W tokens halves them.
        skipped = min(no_ops, length) if state is None else 0
        reading = memory_query[:, skipped:]  # the queries whose reads can be nonzero
        if state is not None:
            value, entries = (F.pad(x, (0, 0, 0, 0, no_ops, 0)) for x in (value, entries))
        read_query = reading
        if entries.shape[1] > reading.shape[1]:  # zero queries for the entries after the last token (a cache's)
            read_query = F.pad(reading, (0, 0, 0, 0, 0, entries.shape[1] - reading.shape[1]))
        key, g, beta = entries.split([self.head_dim, 1, 1], dim=-1)
        read, final_state = chunk_gated_delta_rule(
            read_query,
            key,
            value,
            g=g[..., 0],
            beta=beta[..., 0],
            scale=1.0,
            initial_state=state,
            output_final_state=layer_cache is not None,
            chunk_size=self.chunk_size,
        )
        if layer_cache is not None:  # contiguous: a decode step updates it in place, as a view
            keep_memory_state(layer_cache, final_state.contiguous(), view.differentiable)
        gate = self.read_gate(hidden_states[:, skipped:])
        normed = self.read_norm(read[:, : reading.shape[1]], reading, gate, view.differentiable)
        return F.pad(normed, (0, 0, 0, 0, skipped, 0)) if skipped else normed

    def read_gate(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """The gate on the read: the per-head gate [H], plus with `token_gate` a linear function of each token's
        hidden state [B, T, H] (float32), so that a token can open the memory where it needs what is stored (a
        question) and keep it shut where the read would only add noise (ordinary text)."""
        if self.token_gate is None:
            return self.gate
        return self.gate.float() + F.linear(hidden_states, self.token_gate).float()

    def decode_read(
        self, hidden_states, query, window_values, window_entries, view: WindowView, layer_cache, state
    ) -> torch.Tensor:
        """`read` for one new token with a cache (a decode step): read S, then fold in the token that leaves the
        window now, if the window is full: the general path's result (the reference recurrence over a no-op and that
        token) in a few products instead of a few dozen small ops per layer. S is updated in place in the cache, where
        `update_recurrent_state` would copy it; a forward that records gradients writes a new S instead, since the
        read's backward needs the old one."""
        batch, num_q_heads, _, head_dim = query.shape
        num_heads = window_entries.shape[1]
        if state is None:
            empty = query.new_zeros(batch, num_heads, head_dim, head_dim, dtype=torch.float32)
            state = layer_cache.update_recurrent_state(empty)
        memory_query = query.float().view(batch * num_heads, num_q_heads // num_heads, head_dim)
        read = torch.bmm(memory_query, state.view(batch * num_heads, head_dim, head_dim))  # [B Hkv, G, D]
        if view.cached == self.window - 1:
            value = window_values[:, :, 0].float()  # [B, Hkv, D]
            key, g, beta = window_entries[:, :, 0].split([head_dim, 1, 1], dim=-1)
            if view.differentiable:
                written = gated_delta_write(state, key, value, g[..., 0], beta[..., 0])
                keep_memory_state(layer_cache, written, differentiable=True)
            else:
                gated_delta_write_(state, key, value, g, beta)
        shape = (batch, 1, num_q_heads, head_dim)
        gate = self.read_gate(hidden_states)
        return self.read_norm(read.view(shape), memory_query.view(shape), gate, view.differentiable)
