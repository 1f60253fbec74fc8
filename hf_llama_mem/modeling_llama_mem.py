"""LlamaMem: a Llama decoder whose attention reads the last W tokens exactly and everything older from a memory.

Each memory layer's attention has two readers over the same q, k, v: causal softmax attention over the last
`sliding_window` tokens (RoPE, GQA, through the attention interface the config selects), and a per-kv-head gated
delta-rule matrix S that holds exactly the tokens that have left the window (see memory_ops.py for the op and
its derivation). The cache is a stock transformers `DynamicCache`: layers of type
"hybrid_sliding" keep the window plus S and the key-convolution state; generate() works unchanged.
"""

import math
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from huggingface_hub import HfApi
from torch import nn
from torch.autograd.function import once_differentiable
from transformers import initialization as init
from transformers.cache_utils import Cache, DynamicCache
from transformers.generation import GenerationMixin
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, PreTrainedModel
from transformers.models.llama.modeling_llama import (
    LlamaMLP,
    LlamaRMSNorm,
    LlamaRotaryEmbedding,
    apply_rotary_pos_emb,
    eager_attention_forward,
    repeat_kv,
)
from transformers.utils import logging

from .causal_lm_loss import causal_lm_loss
from .configuration_llama_mem import LlamaMemConfig
from .memory_ops import chunk_gated_delta_rule, gated_delta_write_, recurrent_gated_delta_rule

__all__ = ["LlamaMemForCausalLM", "LlamaMemModel", "LlamaMemPreTrainedModel"]

logger = logging.get_logger(__name__)

# transformers 5.24 renamed the cache field of model outputs (and the forward keyword) from `past_key_values` to
# `cache`; generate() reads whichever name the installed version uses.
CACHE_FIELD = "cache" if "cache" in BaseModelOutputWithPast.__dataclass_fields__ else "past_key_values"
# Queries per block of the windowed attention: a block attends at most block + W - 1 keys under a mask, which keeps
# long inputs O(T * W) instead of O(T^2). The masked part of each block is computed and thrown away, so smaller blocks
# waste less, but each block costs a kernel call and, when its inputs need gradients, a backward pass of its own. On a
# CPU, 256 queries was the fastest with gradients and 64 without (the attention of a 2K prefill segment 6% faster).
QUERY_BLOCK = 256
INFERENCE_QUERY_BLOCK = 64
# Without gradients, a longer input runs through the cache in pieces of this many tokens (see LlamaMemModel.forward).
PREFILL_SEGMENT = 2048
# Up to this many new tokens, the key convolution is computed as a weighted sum of its taps (cheaper per call).
SHORT_CONV_LENGTH = 4


@dataclass
class WindowView:
    """What every layer needs to attend over its window in one forward call (shared by all layers).

    cached: tokens already in the cache window before this call. key_valid: [B, cached + T] bool, False at padding,
    None when every token is real. token_valid: [B, T], the part of key_valid for this call's tokens. masks: the
    additive masks built so far in this call, reused by every layer (and, without padding, by every block of the same
    shape).
    """

    window: int
    cached: int
    key_valid: torch.Tensor | None
    token_valid: torch.Tensor | None
    masks: dict = field(default_factory=dict)

    def mask(self, q_first: int, q_len: int, k_first: int, k_len: int, dtype, device) -> torch.Tensor:
        """Additive mask [B or 1, 1, q_len, k_len] for the queries at key indices q_first.. (indices into the cached
        window followed by this call's tokens) against the keys at k_first..: causal, within the window, never a key
        before index 0 nor a padding key (a padded query sees only itself, so its softmax row is never empty; its
        output is never used). Keys past the end are block filler, visible only to filler queries."""
        # Without padding the mask depends only on where the queries sit relative to the keys.
        if self.key_valid is None:
            cache_key = (q_first - k_first, max(0, -k_first), q_len, k_len, dtype, device)
        else:
            cache_key = (q_first, k_first, q_len, k_len, dtype, device)
        if cache_key not in self.masks:
            q_pos = torch.arange(q_first, q_first + q_len, device=device)[:, None]
            k_pos = torch.arange(k_first, k_first + k_len, device=device)[None, :]
            allowed = (k_pos >= 0) & (k_pos <= q_pos) & (q_pos - k_pos < self.window)
            if self.key_valid is None:
                allowed = allowed[None, None]
            else:
                known = self.key_valid[:, max(k_first, 0) : max(k_first + k_len, 0)]
                front = max(0, -k_first)
                valid = F.pad(known, (front, k_len - front - known.shape[1]), value=True)
                allowed = allowed & (valid[:, None, None, :] | (k_pos == q_pos))
            self.masks[cache_key] = torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill(
                ~allowed, torch.finfo(dtype).min
            )
        return self.masks[cache_key]


def sdpa_block(
    module: nn.Module, query, key, value, mask, *, is_causal: bool, dropout: float = 0.0, scaling=None, **kwargs
):
    """torch's scaled_dot_product_attention on one block, [B, T, H, D] out. On a CPU the kernel takes grouped-query
    keys and a mask together, which saves copying every block's keys and values for each query head (other devices
    fall back to a slow kernel for that combination, so there the keys are expanded, as transformers does)."""
    groups = query.shape[1] // key.shape[1]
    if groups > 1 and mask is not None and query.device.type != "cpu":
        key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    out = F.scaled_dot_product_attention(
        query,
        key,
        value,
        attn_mask=mask,
        dropout_p=dropout,
        is_causal=is_causal,
        scale=scaling,
        enable_gqa=key.shape[1] != query.shape[1],
    )
    return out.transpose(1, 2), None


def windowed_attention(
    module: nn.Module,
    interface: Callable,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    view: WindowView,
    **kwargs,
) -> torch.Tensor:
    """Exact softmax attention of each query over the last W keys. query [B, H, T, D]; key, value
    [B, Hkv, cached + T, D]. Returns [B, T, H, D]."""
    length = query.shape[2]
    if interface is ALL_ATTENTION_FUNCTIONS.get("sdpa"):
        interface = sdpa_block
    outputs, done = [], 0
    if interface is sdpa_block and view.cached == 0 and view.key_valid is None and length > 1:
        # The first W queries of an unpadded sequence from its start cannot reach past the window: plain causal
        # attention, which a causal kernel computes without the upper triangle.
        done = min(view.window, length)
        head = (query[:, :, :done], key[:, :, :done], value[:, :, :done])
        outputs.append(interface(module, *head, None, is_causal=True, **kwargs)[0])
    if done < length:
        outputs.append(banded_attention(module, interface, query[:, :, done:], key, value, view, **kwargs))
    return torch.cat(outputs, dim=1) if len(outputs) > 1 else outputs[0]


def banded_attention(
    module: nn.Module, interface: Callable, query, key, value, view: WindowView, **kwargs
) -> torch.Tensor:
    """The last `query.shape[2]` queries of the call over their windows, in blocks of QUERY_BLOCK queries (without
    gradients INFERENCE_QUERY_BLOCK) that each attend block + W - 1 keys under a mask. Returns [B, T, H, D]."""
    length, total = query.shape[2], key.shape[2]
    q_first = total - length  # key index of the first query
    k_first = q_first - view.window + 1
    block = min(QUERY_BLOCK if query.requires_grad else INFERENCE_QUERY_BLOCK, length)
    if block == length:
        start = max(k_first, 0)
        if view.key_valid is None and length == 1:
            mask = None  # one query without padding (a decode step): every key from `start` on is visible
        else:
            mask = view.mask(q_first, length, start, total - start, query.dtype, query.device)
        return interface(module, query, key[:, :, start:], value[:, :, start:], mask, is_causal=False, **kwargs)[0]
    # Every block's keys are one strided view (unfold) of the keys padded to whole blocks, so the backward gathers
    # all blocks' key gradients in one pass: slicing each block would zero-fill a gradient as large as all the keys
    # once per block.
    blocks = -(-length // block)
    width = block + view.window - 1
    fill = blocks * block - length
    pad = (0, 0, max(0, -k_first), fill)
    key_blocks, value_blocks = (
        F.pad(x[:, :, max(k_first, 0) :], pad).unfold(2, width, block).transpose(-1, -2).unbind(2)
        for x in (key, value)
    )
    query_blocks = F.pad(query, (0, 0, 0, fill)).unflatten(2, (blocks, block)).unbind(2)
    outputs = []
    for n, block_inputs in enumerate(zip(query_blocks, key_blocks, value_blocks, strict=True)):
        mask = view.mask(q_first + n * block, block, k_first + n * block, width, query.dtype, query.device)
        outputs.append(interface(module, *block_inputs, mask, is_causal=False, **kwargs)[0])
    return torch.cat(outputs, dim=1)[:, :length]


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

    def forward(self, read: torch.Tensor, query: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        """read, query [B, T, H, D] float32; gate [H]."""
        if torch.is_grad_enabled() and any(x.requires_grad for x in (read, query, self.weight, gate)):
            return _ReadNorm.apply(read, query, self.weight, gate, self.eps)
        # Nothing to differentiate (prefill, decode): the same arithmetic without an autograd Function's overhead,
        # which in a decode step costs more than the arithmetic.
        return read_norm_forward(read, query, self.weight, gate, self.eps)[0]


def read_norm_forward(read, query, weight, gate, eps) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """out = r * s * (weight gate) with s = (mean(r^2) + eps max(|q|^2, L2_EPS^2))^-1/2, per row of [B, T, H, D].
    Returns out, s and where |q|^2 was above the floor (what the backward needs)."""
    # Norms as reductions and products in place: on long inputs every full-size temporary costs.
    query_norm_sq = torch.linalg.vector_norm(query, dim=-1, keepdim=True).square_()
    unclamped = query_norm_sq > L2_EPS**2
    read_mean_sq = torch.linalg.vector_norm(read, dim=-1, keepdim=True).square_().div_(read.shape[-1])
    scale = read_mean_sq.add_(query_norm_sq.clamp_min_(L2_EPS**2), alpha=eps).rsqrt_()
    return (read * scale).mul_(weight * gate[:, None]), scale, unclamped


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
        weighted_grad = out_grad * (weight * gate[:, None])
        # d loss / d (mean(r^2) + eps |q|^2), through s = x^-1/2
        norm_grad = (weighted_grad * read).sum(-1, keepdim=True).mul_(scale.pow(3)).mul_(-0.5)
        read_grad = weighted_grad.mul_(scale).addcmul_(read, norm_grad, value=2.0 / read.shape[-1])
        query_grad = query * (norm_grad * unclamped).mul_(2.0 * ctx.eps)
        per_channel = per_channel.sum((0, 1))  # [H, D]
        weight_grad = (per_channel * gate[:, None]).sum(0)
        gate_grad = (per_channel * weight).sum(-1)
        return read_grad, query_grad, weight_grad, gate_grad, None


def keep_owned_window(layer, window: int) -> None:
    """Keep exactly the last W - 1 tokens of a cache layer's window, in tensors the layer owns.

    The stock sliding-window layer keeps a view of everything passed to `update`, so after a long prefill the whole
    prefill stays pinned in memory; a copy of what is kept makes the cache size independent of the context length.
    """
    keep = window - 1
    for name in ("keys", "values"):
        kept = getattr(layer, name)
        kept = kept[:, :, max(0, kept.shape[2] - keep) :]
        if kept.untyped_storage().nbytes() > 2 * kept.nbytes:  # a decode step's view of W tokens is fine
            kept = kept.clone()
        setattr(layer, name, kept)


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
        self.key_conv = nn.Conv1d(channels, channels, config.memory_conv_size, groups=channels, bias=False)
        if self.gated:
            self.decay_proj = nn.Linear(config.hidden_size, config.num_key_value_heads, bias=False)
            self.decay_bias = nn.Parameter(torch.zeros(config.num_key_value_heads))
            self.decay_log_rate = nn.Parameter(torch.zeros(config.num_key_value_heads))
        self.write_proj = nn.Linear(config.hidden_size, config.num_key_value_heads, bias=True)
        self.read_norm = MemoryReadRMSNorm(config.head_dim, eps=config.rms_norm_eps)
        self.gate = nn.Parameter(torch.ones(config.num_attention_heads))

    def forward(self, step: str, *args) -> torch.Tensor:
        """`step` "write" runs `entries(*args)`, "read" runs `read(*args)`. Both go through forward because module
        hooks only see forward calls: accelerate's offloading moves this module's own parameters (gate, decay) onto
        the execution device in a hook, and would otherwise leave them on disk."""
        if step == "write":
            return self.entries(*args)
        if step == "read":
            return self.read(*args)
        raise ValueError(f"step must be 'write' or 'read', got {step!r}.")

    def entries(self, hidden_states, key, value, token_valid, layer_cache) -> torch.Tensor:
        """What this call's tokens will write: [value | memory key | g | beta], [B, Hkv, T, 2D + 2] in the model dtype.

        hidden_states [B, T, hidden]; key (pre-RoPE), value [B, Hkv, T, D]. Padded tokens write nothing.
        """
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
        if length <= SHORT_CONV_LENGTH:  # decode: a weighted sum of the taps beats a convolution call
            windows = padded.unfold(-1, taps + 1, 1)  # [B, C, T, taps + 1]
            memory_key = (windows * self.key_conv.weight).sum(-1)  # weight [C, 1, taps + 1]
        else:
            memory_key = self.key_conv(padded)
        if layer_cache is not None and taps > 0:
            # after the convolution: the cache overwrites its conv state in place
            layer_cache.update_conv_state(conv_input, conv_kernel_size=taps)
        memory_key = l2_normalize(memory_key.view(batch, num_heads, head_dim, length).transpose(2, 3))

        beta = torch.sigmoid(self.write_proj(hidden_states).float())
        if self.gated:
            g = -self.decay_log_rate.exp() * F.softplus(self.decay_proj(hidden_states).float() + self.decay_bias)
        else:
            g = torch.zeros_like(beta)
        if token_valid is not None:
            beta, g = beta * token_valid[..., None], g * token_valid[..., None]
        scalars = torch.stack([g, beta], dim=-1).transpose(1, 2)  # [B, Hkv, T, 2]
        return torch.cat([value, memory_key.to(value.dtype), scalars.to(value.dtype)], dim=-1)

    def read(self, query, window_entries, cached, layer_cache) -> torch.Tensor:
        """Memory read for every query: [B, T, H, D] in float32, normed and gated.

        query: pre-RoPE [B, H, T, D]. window_entries: [B, Hkv, cached + T, 2D + 2], the cached window followed by
        this call's tokens (without a cache, at least the first T - W of them: only those leave the window). The read
        at step t sees exactly the tokens j <= t - W: in the stream of tokens leaving the window, front-padded with
        no-op writes, the read at t comes after the writes of the t + 1 entries before it.
        """
        length = query.shape[2]
        state = None
        if layer_cache is not None and layer_cache.is_recurrent_states_initialized[0]:
            state = layer_cache.recurrent_states[0]
        if layer_cache is not None and length == 1:
            return self.decode_read(query, window_entries, cached, layer_cache, state)
        # With a cache the final state must include the token that leaves at the last step: one more stream entry,
        # read by a zero query.
        stream_length = length + (layer_cache is not None)
        no_ops = min(self.window - cached, stream_length)
        entries = window_entries[:, :, : stream_length - no_ops].transpose(1, 2)
        # The query's L2 normalisation is folded into the read norm (MemoryReadRMSNorm).
        memory_query = query.transpose(1, 2).float()
        # Until the first write the memory is empty and every read is exactly zero (and depends on nothing): the op
        # and the norm start at the first write, which on a fresh input of 2W tokens halves them.
        skipped = min(no_ops, length) if state is None else 0
        reading = memory_query[:, skipped:]  # the queries whose reads can be nonzero
        if state is not None:
            entries = F.pad(entries, (0, 0, 0, 0, no_ops, 0))
        read_query = reading
        if entries.shape[1] > reading.shape[1]:  # zero queries for the entries after the last token (a cache's)
            read_query = F.pad(reading, (0, 0, 0, 0, 0, entries.shape[1] - reading.shape[1]))
        value, key, g, beta = entries.split([self.head_dim, self.head_dim, 1, 1], dim=-1)
        op_length = read_query.shape[1]
        op_kwargs = {"chunk_size": self.chunk_size} if op_length > 2 else {}
        op = chunk_gated_delta_rule if op_length > 2 else recurrent_gated_delta_rule
        read, final_state = op(
            read_query,
            key,
            value,
            g=g[..., 0],
            beta=beta[..., 0],
            scale=1.0,
            initial_state=state,
            output_final_state=layer_cache is not None,
            **op_kwargs,
        )
        if layer_cache is not None:
            layer_cache.update_recurrent_state(final_state.contiguous())  # decode updates it in place, as a view
        normed = self.read_norm(read[:, : reading.shape[1]], reading, self.gate)
        return F.pad(normed, (0, 0, 0, 0, skipped, 0)) if skipped else normed

    def decode_read(self, query, window_entries, cached, layer_cache, state) -> torch.Tensor:
        """`read` for one new token with a cache (a decode step): read S, then fold in the token that leaves the
        window now, if the window is full: the general path's result (the reference recurrence over a no-op and that
        token) in a few products instead of a few dozen small ops per layer. S is updated in place in the cache, where
        `update_recurrent_state` would copy it (cached forwards are for inference: a backward through several of them
        already failed on the cache's in-place copies)."""
        batch, num_q_heads, _, head_dim = query.shape
        num_heads = window_entries.shape[1]
        if state is None:
            empty = query.new_zeros(batch, num_heads, head_dim, head_dim, dtype=torch.float32)
            state = layer_cache.update_recurrent_state(empty)
        memory_query = query.float().view(batch * num_heads, num_q_heads // num_heads, head_dim)
        read = torch.bmm(memory_query, state.view(batch * num_heads, head_dim, head_dim))  # [B Hkv, G, D]
        if cached == self.window - 1:
            leaving = window_entries[:, :, 0].float()  # [B, Hkv, 2D + 2]
            value, key, g, beta = leaving.split([head_dim, head_dim, 1, 1], dim=-1)
            gated_delta_write_(state, key, value, g, beta)
        shape = (batch, 1, num_q_heads, head_dim)
        return self.read_norm(read.view(shape), memory_query.view(shape), self.gate)


class LlamaMemAttention(nn.Module):
    """Llama attention over the last W tokens, plus the memory reader on memory layers.

    Adapted from transformers.models.llama.modeling_llama.LlamaAttention: same projections and names, so a Llama
    checkpoint loads by a plain copy.
    """

    def __init__(self, config: LlamaMemConfig, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.head_dim = config.head_dim
        self.num_key_value_groups = config.num_attention_heads // config.num_key_value_heads
        self.scaling = self.head_dim**-0.5
        self.attention_dropout = config.attention_dropout
        self.is_causal = True
        hidden, heads, kv_heads = config.hidden_size, config.num_attention_heads, config.num_key_value_heads
        self.q_proj = nn.Linear(hidden, heads * self.head_dim, bias=config.attention_bias)
        self.k_proj = nn.Linear(hidden, kv_heads * self.head_dim, bias=config.attention_bias)
        self.v_proj = nn.Linear(hidden, kv_heads * self.head_dim, bias=config.attention_bias)
        self.o_proj = nn.Linear(heads * self.head_dim, hidden, bias=config.attention_bias)
        self.memory = LlamaMemMemory(config, layer_idx) if config.has_memory(layer_idx) else None

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        view: WindowView,
        cache: Cache | None = None,
    ) -> torch.Tensor:
        batch, length, _ = hidden_states.shape
        hidden_shape = (batch, length, -1, self.head_dim)
        query = self.q_proj(hidden_states).view(hidden_shape).transpose(1, 2)  # [B, H, T, D]
        key = self.k_proj(hidden_states).view(hidden_shape).transpose(1, 2)  # [B, Hkv, T, D]
        value = self.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        layer_cache = cache.layers[self.layer_idx] if cache is not None else None
        memory_cache = layer_cache if self.memory is not None else None

        stored = value
        if self.memory is not None:
            # A token is written into the memory when it leaves the window. With a cache every token will (its entry
            # waits in the cache window); without one only the first T - W tokens do, and only theirs are computed.
            writes, token_valid = (hidden_states, key, value), view.token_valid
            if layer_cache is None and length > view.window:
                leaving = length - view.window
                writes = tuple(x[..., :leaving, :] for x in writes)  # each [..., T, dim]
                token_valid = None if token_valid is None else token_valid[:, :leaving]
            entries = self.memory("write", *writes, token_valid, memory_cache)
            if layer_cache is not None:
                stored = entries
        cos, sin = position_embeddings
        rotated_query, rotated_key = apply_rotary_pos_emb(query, key, cos, sin)
        if layer_cache is not None:
            rotated_key, stored = layer_cache.update(rotated_key, stored)
            keep_owned_window(layer_cache, view.window)

        interface = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, eager_attention_forward)
        output = windowed_attention(
            self,
            interface,
            rotated_query,
            rotated_key,
            stored[..., : self.head_dim],
            view,
            dropout=self.attention_dropout if self.training else 0.0,
            scaling=self.scaling,
        )
        if self.memory is not None:
            window_entries = stored if layer_cache is not None else entries
            read = self.memory("read", query, window_entries, view.cached, memory_cache)
            output = output + read.to(output.dtype)
        return self.o_proj(output.reshape(batch, length, -1))


class LlamaMemDecoderLayer(GradientCheckpointingLayer):
    """Pre-norm decoder block, as in Llama: attention (with memory) and a SwiGLU MLP."""

    def __init__(self, config: LlamaMemConfig, layer_idx: int):
        super().__init__()
        self.self_attn = LlamaMemAttention(config, layer_idx)
        self.mlp = LlamaMLP(config)
        self.input_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        view: WindowView,
        cache: Cache | None = None,
    ) -> torch.Tensor:
        attended = self.self_attn(self.input_layernorm(hidden_states), position_embeddings, view, cache)
        hidden_states = hidden_states + attended
        return hidden_states + self.mlp(self.post_attention_layernorm(hidden_states))


class LlamaMemPreTrainedModel(PreTrainedModel):
    config_class = LlamaMemConfig
    config: LlamaMemConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["LlamaMemDecoderLayer"]
    _supports_sdpa = True
    _supports_attention_backend = False
    _supports_flash_attn = False
    _supports_flex_attn = False
    # The memory is a recurrent state: generate() must not try to roll it back (assisted decoding).
    _is_stateful = True

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        # transformers' init functions skip tensors already loaded from a checkpoint.
        if isinstance(module, nn.Conv1d):
            # PyTorch's default start for the key convolution (as DeltaNet): a near-identity start learns slower.
            init.kaiming_uniform_(module.weight, a=math.sqrt(5))
        else:
            super()._init_weights(module)
        if isinstance(module, LlamaMemMemory):
            # A fresh model starts with the gate at config.memory_gate_init (1.0, open: on associative recall a closed
            # gate learns far more slowly, DESIGN.md section 1). Conversion from Llama closes it (`from_llama`),
            # which keeps the retrofit exact.
            init.constant_(module.gate, self.config.memory_gate_init)
            if module.gated:
                # Per-token decay exp(-softplus(bias)) starts between 0.90 and 0.999, as in Mamba and GDN.
                step = torch.empty_like(module.decay_bias).uniform_(math.log(1e-3), math.log(1e-1)).exp()
                init.copy_(module.decay_bias, step + torch.log(-torch.expm1(-step)))
                init.zeros_(module.decay_log_rate)

    # Writes README.md into saved folders; installed by `import hf_llama_mem` (its model_card.py renders the card
    # from the package's template, which the exported code files do not carry).
    model_card_writer: Callable | None = None

    def save_pretrained(self, save_directory, *args, **kwargs):
        """Save as transformers does, with `auto_map` naming all three Auto classes, so that the folder loads with
        `trust_remote_code=True` where hf_llama_mem is not installed (transformers writes only the saved class),
        plus a model card when the package is installed."""
        self.config.auto_map = {
            "AutoConfig": "configuration_llama_mem.LlamaMemConfig",
            "AutoModel": "modeling_llama_mem.LlamaMemModel",
            "AutoModelForCausalLM": "modeling_llama_mem.LlamaMemForCausalLM",
        }
        super().save_pretrained(save_directory, *args, **kwargs)
        if self.model_card_writer is not None and kwargs.get("is_main_process", True):
            self.model_card_writer(self.config, save_directory, results_from=self.name_or_path)

    def push_to_hub(
        self,
        repo_id: str,
        *,
        commit_message: str | None = None,
        commit_description: str | None = None,
        private: bool | None = None,
        token: bool | str | None = None,
        revision: str | None = None,
        create_pr: bool = False,
        max_shard_size: int | str | None = "50GB",
        tags: list[str] | None = None,
    ):
        """Upload weights, code files, config and model card, as transformers does, except that the card is this
        model's own (transformers would replace it with a generic one)."""
        if self.model_card_writer is None:
            return super().push_to_hub(
                repo_id,
                commit_message=commit_message,
                commit_description=commit_description,
                private=private,
                token=token,
                revision=revision,
                create_pr=create_pr,
                max_shard_size=max_shard_size,
                tags=tags,
            )
        api = HfApi(token=token)
        repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
        if revision is not None and not revision.startswith("refs/pr"):
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        with tempfile.TemporaryDirectory() as folder:
            self.save_pretrained(folder, max_shard_size=max_shard_size)
            self.model_card_writer(
                self.config, folder, results_from=self.name_or_path, model_name=repo_id, tags=tags or []
            )
            return api.upload_folder(
                repo_id=repo_id,
                folder_path=folder,
                commit_message=commit_message or "Upload model",
                commit_description=commit_description,
                revision=revision,
                create_pr=create_pr,
            )

    def memory_parameters(self) -> list[nn.Parameter]:
        """The parameters of the memory readers (gates, decay and write projections, key convolution, read norm)."""
        return [p for name, p in self.named_parameters() if ".memory." in name]


class LlamaMemModel(LlamaMemPreTrainedModel):
    def __init__(self, config: LlamaMemConfig):
        super().__init__(config)
        self.padding_idx = config.pad_token_id
        self.vocab_size = config.vocab_size
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList(LlamaMemDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = LlamaRotaryEmbedding(config=config)
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embed_tokens = value

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        past_key_values: Cache | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPast | tuple:
        cache = resolve_cache_argument(cache, past_key_values)
        inputs_embeds = self.embed(input_ids, inputs_embeds)
        batch, length = inputs_embeds.shape[:2]
        use_cache = use_cache if use_cache is not None else (self.config.use_cache and not self.training)
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled() and (use_cache or cache):
            logger.warning_once("Gradient checkpointing replays layers, which would write the memory twice: no cache.")
            use_cache, cache = False, None
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        check_cache_batch(cache, batch)

        past = cache.get_seq_length() if cache is not None else 0
        check_attention_mask(attention_mask, batch, past, length)
        output_hidden_states = (
            output_hidden_states if output_hidden_states is not None else self.config.output_hidden_states
        )
        # A long prefill runs segment by segment through the cache (exactly equal, as any prefill split is): peak
        # memory stays that of one segment, and the working set stays small enough to be fast.
        segment = PREFILL_SEGMENT if cache is not None and not torch.is_grad_enabled() else max(length, 1)
        pieces = []
        for start in range(0, max(length, 1), segment):
            end = min(start + segment, length)
            pieces.append(
                self.run_layers(
                    inputs_embeds[:, start:end],
                    None if attention_mask is None else attention_mask[:, : past + end],
                    None if position_ids is None else position_ids[:, start:end],
                    cache,
                    past + start,
                    output_hidden_states,
                )
            )
        if len(pieces) == 1:
            all_hidden_states = pieces[0]
        else:
            all_hidden_states = tuple(torch.cat(states, dim=1) for states in zip(*pieces, strict=True))
        hidden_states = all_hidden_states[-1]

        output = BaseModelOutputWithPast(
            last_hidden_state=hidden_states,
            hidden_states=all_hidden_states if output_hidden_states else None,
            **{CACHE_FIELD: cache},
        )
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        return output if return_dict else output.to_tuple()

    def run_layers(self, inputs_embeds, attention_mask, position_ids, cache, past, output_hidden_states):
        """Every layer over one piece of the input, `past` tokens after the start; returns the final normed hidden
        states, after each layer's input when output_hidden_states."""
        length = inputs_embeds.shape[1]
        view = make_window_view(self.config.sliding_window, past, attention_mask, inputs_embeds.device)
        if position_ids is None:
            position_ids = positions_from_mask(attention_mask, past, length, inputs_embeds.device)
        position_embeddings = self.rotary_emb(inputs_embeds, position_ids=position_ids)
        all_hidden_states = []
        hidden_states = inputs_embeds
        for layer in self.layers:
            if output_hidden_states:
                all_hidden_states.append(hidden_states)
            hidden_states = layer(hidden_states, position_embeddings, view, cache)
        return (*all_hidden_states, self.norm(hidden_states))

    def embed(self, input_ids: torch.LongTensor | None, inputs_embeds: torch.Tensor | None) -> torch.Tensor:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Pass exactly one of input_ids or inputs_embeds (got both or neither).")
        if inputs_embeds is not None:
            return inputs_embeds
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must have shape [batch, length], got {tuple(input_ids.shape)}.")
        out_of_range = (input_ids < 0) | (input_ids >= self.config.vocab_size)
        if out_of_range.any():
            bad = input_ids[out_of_range][0].item()
            raise ValueError(f"Token id {bad} is outside [0, vocab_size={self.config.vocab_size}).")
        return self.embed_tokens(input_ids)


def resolve_cache_argument(cache: Cache | None, past_key_values: Cache | None) -> Cache | None:
    """transformers < 5.24 passes the cache as `past_key_values`, 5.24+ as `cache`: accept either, not two."""
    if cache is not None and past_key_values is not None and cache is not past_key_values:
        raise ValueError("Pass the cache as `cache` or as `past_key_values`, not two different caches.")
    cache = cache if cache is not None else past_key_values
    if cache is not None and not isinstance(cache, Cache):
        raise ValueError(f"The cache must be a transformers Cache (e.g. DynamicCache(config=...)), got {type(cache)}.")
    return cache


def check_cache_batch(cache: Cache | None, batch: int) -> None:
    for layer in cache.layers if cache is not None else []:
        keys = getattr(layer, "keys", None)
        if keys is not None and keys.numel() and keys.shape[0] != batch:
            raise ValueError(f"The cache holds a batch of {keys.shape[0]} sequences, but the input has {batch}.")


def check_attention_mask(attention_mask, batch: int, past: int, length: int) -> None:
    """attention_mask is [B, past + T] (1 = real token, 0 = padding) or None."""
    if attention_mask is not None and (attention_mask.dim() != 2 or attention_mask.shape != (batch, past + length)):
        raise ValueError(
            f"attention_mask must have shape [batch, past + length] = [{batch}, {past + length}] "
            f"(past = {past} cached tokens), got {tuple(attention_mask.shape)}."
        )


def make_window_view(window: int, past: int, attention_mask, device) -> WindowView:
    """Window bookkeeping for one call. attention_mask is [B, past + T] (1 = real token, 0 = padding) or None, already
    checked by the forward that calls this."""
    cached = min(past, window - 1)
    if attention_mask is None:
        return WindowView(window, cached, None, None)
    key_valid = attention_mask[:, past - cached :].to(device=device, dtype=torch.bool)
    if bool(key_valid.all()):
        return WindowView(window, cached, None, None)
    return WindowView(window, cached, key_valid, key_valid[:, cached:])


def positions_from_mask(attention_mask, past: int, length: int, device) -> torch.LongTensor:
    """Positions count real tokens only, so a left-padded row is computed exactly as the same row unpadded.

    Reads the whole mask, not just the window: padding that has left the window still shifts the positions."""
    if attention_mask is None or bool(attention_mask.all()):
        return torch.arange(past, past + length, device=device)[None]
    positions = attention_mask.long().cumsum(-1) - 1
    return positions.clamp(min=0)[:, -length:].to(device)


class LlamaMemForCausalLM(LlamaMemPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: LlamaMemConfig):
        super().__init__(config)
        self.model = LlamaMemModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        # transformers' causal-LM loss, computed without full-size log-probabilities (causal_lm_loss.py), through
        # PreTrainedModel's own loss_function setter: assigning another replaces it, as for any transformers model.
        self.loss_function = causal_lm_loss
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.embed_tokens = value

    @classmethod
    def from_llama(cls, source, **config_overrides) -> "LlamaMemForCausalLM":
        """Convert a Llama-family causal LM (an instance, a local folder or a hub id) into LlamaMem.

        Every source tensor is copied exactly once; the memory gates start closed, so the result equals the source
        up to W tokens and the source with a W-token sliding window beyond, until it is trained. `config_overrides`
        set LlamaMemConfig fields (sliding_window, memory_rule, memory_layers, ...).
        """
        from .convert_llama import convert_from_llama

        return convert_from_llama(cls, source, **config_overrides)

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        past_key_values: Cache | None = None,
        **kwargs,
    ) -> CausalLMOutputWithPast | tuple:
        """Causal LM forward. `num_items_in_batch` (passed by Trainer through kwargs) goes to the loss."""
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=resolve_cache_argument(cache, past_key_values),
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            output_hidden_states=output_hidden_states,
            return_dict=True,
        )
        hidden_states = outputs.last_hidden_state
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(hidden_states[:, keep, :])
        loss = None
        if labels is not None:
            loss_kwargs = {k: v for k, v in kwargs.items() if k in ("num_items_in_batch", "ignore_index")}
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **loss_kwargs)
        output = CausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            hidden_states=outputs.hidden_states,
            **{CACHE_FIELD: getattr(outputs, CACHE_FIELD)},
        )
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        return output if return_dict else output.to_tuple()
