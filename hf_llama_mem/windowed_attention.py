"""Exact softmax attention over a sliding window of W keys, computed in blocks so that long inputs cost O(T * W).

`WindowView` is the per-call bookkeeping every layer shares (how many tokens the cache window holds, which keys are
padding, the masks built so far); `windowed_attention` runs any transformers attention interface over the window;
`keep_owned_window` trims a cache layer to the W - 1 tokens the next call needs, in tensors the cache owns;
`LlamaMemCacheLayer` is a memory layer's cache; `prepare_cache` checks (and completes) the cache a forward is given,
and gives a StaticCache the fixed-shape layers of fixed_cache.py.
"""

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from transformers.cache_utils import (
    Cache,
    DynamicLayer,
    DynamicSlidingWindowLayer,
    LinearAttentionAndSlidingWindowAttentionLayer,
    LinearAttentionAndStaticSlidingWindowAttentionLayer,
    StaticCache,
    StaticSlidingWindowLayer,
)
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.llama.modeling_llama import repeat_kv

from .fixed_cache import FixedWindowLayer, LlamaMemFixedLayer

__all__ = [
    "LlamaMemCacheLayer",
    "WindowView",
    "check_not_packed",
    "check_padding_is_exact",
    "fixed_slots",
    "keep_owned_window",
    "known_unpadded",
    "make_window_view",
    "positions_from_mask",
    "prepare_cache",
    "windowed_attention",
]

# Queries per block of the windowed attention: a block attends at most block + W - 1 keys under a mask, which keeps
# long inputs O(T * W) instead of O(T^2). The masked part of each block is computed and thrown away, so smaller blocks
# waste less, but each block costs a kernel call and, when its inputs need gradients, a backward pass of its own. On a
# CPU, 256 queries was the fastest with gradients and 64 without (the attention of a 2K prefill segment 6% faster).
QUERY_BLOCK = 256
INFERENCE_QUERY_BLOCK = 64
# A kept window may sit in a storage up to this many times its size before it is copied out: after a decode step the
# W - 1 kept tokens are a view of the W just concatenated, which is fine; after a prefill they would pin all of it.
MAX_WINDOW_STORAGE_RATIO = 2
# The per-token tensors of a cache layer's window, each [B, Hkv, tokens, ...]: attention keys (after RoPE) and values,
# and on a memory layer what each of those tokens writes into the memory when it leaves the window.
WINDOW_TENSORS = ("keys", "values", "memory_entries")


@dataclass
class WindowView:
    """What every layer needs to attend over its window in one forward call (shared by all layers), and the choice of
    the paths that compute it, made once per forward.

    cached: tokens already in the cache window before this call. key_valid: [B, cached + T] bool, False at padding,
    None when every token is known to be real. token_valid: [B, T], the part of key_valid for this call's tokens.
    decoding: this call appends one token to a cache (a decode step). differentiable: the forward records gradients
    (grad mode on, and a parameter or the input embeddings require them). masks: the additive masks built so far in
    this call, reused by every layer (and, without padding, by every block of the same shape).

    Every fast path reads these fields, never the tensors' lengths or gradient flags; each computes exactly what the
    general path would:
    - decoding: attention over the window without a mask when nothing is padded (`banded_attention`); the memory
      key's convolution as a weighted sum of its taps (`LlamaMemMemory.entries`); the memory read as one product
      with S, then the leaving token written into S in place (`LlamaMemMemory.decode_read`).
    - not differentiable: attention in blocks of INFERENCE_QUERY_BLOCK queries instead of QUERY_BLOCK
      (`banded_attention`); the read norm without an autograd Function (`MemoryReadRMSNorm`); with a cache, a long
      input in pieces of PREFILL_SEGMENT tokens (`LlamaMemModel.forward`).
    - key_valid None and cached == 0 (an unpadded input from its start): the first W queries through a causal
      kernel (`windowed_attention`).
    key_valid is None only where an all-ones mask is known without a device sync (`known_unpadded`: on a CPU, not
    under torch.compile); on an accelerator any mask takes the padded paths, which compute the same. A fixed-shape
    cache's window always has key_valid (which of its W - 1 slots hold a real token).
    """

    window: int
    cached: int
    key_valid: torch.Tensor | None
    token_valid: torch.Tensor | None
    decoding: bool
    differentiable: bool
    # False: the memory layers neither write nor read (the windowed model, whose surprisal gates the writes).
    reads_memory: bool = True
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
    if interface is sdpa_block and view.cached == 0 and view.key_valid is None:
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
    block = min(QUERY_BLOCK if view.differentiable else INFERENCE_QUERY_BLOCK, length)
    if block == length:
        start = max(k_first, 0)
        if view.decoding and view.key_valid is None:
            mask = None  # one query without padding: every key from `start` on is visible
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


def known_unpadded(mask: torch.Tensor) -> bool:
    """Whether a 0/1 mask is all ones, where that is free to know: on a CPU it is a host reduction, and an all-ones
    mask (what generate() passes) then takes the unpadded fast paths. On an accelerator the answer would stall the
    host until the device catches up, every forward, so there the mask is used as given (the same result); so it is
    under torch.compile, where a branch on a tensor's value would split the graph."""
    return mask.device.type == "cpu" and not torch.compiler.is_compiling() and bool(mask.all())


def check_padding_is_exact(mask: torch.Tensor) -> None:
    """Refuse padding between real tokens. mask: [B, past + T], 1 = real token, 0 = padding.

    The window is the last W positions, pads included, and a pad writes nothing to the memory: pads before a row's
    first real token (left padding) or after its last (right padding, for the tokens before it) change nothing, but a
    pad between real tokens takes a real token's place in the window, so the tokens after it would see fewer than W
    real tokens exactly. Such a mask is refused rather than computed differently from the same row unpadded; the
    usual way to get one is a cached step or generate() after right padding. Checked where reading the mask is free
    (a CPU mask with padding, `known_unpadded`); on an accelerator the answer would stall the host every forward, so
    there the mask is used as given.
    """
    if mask.device.type != "cpu" or torch.compiler.is_compiling() or known_unpadded(mask):
        return
    real = mask.bool()
    # A row is exact when its real tokens are one run: at most one real token follows a pad or starts the row.
    run_starts = real & ~F.pad(real[:, :-1], (1, 0), value=False)
    runs = run_starts.sum(-1)
    if bool((runs > 1).any()):
        row = int((runs > 1).nonzero()[0, 0])
        first = int(real[row].nonzero()[0, 0])
        gap = first + int((~real[row, first:]).nonzero()[0, 0])
        gap_end = gap + int(real[row, gap:].nonzero()[0, 0])
        raise ValueError(
            f"attention_mask row {row} has padding between real tokens (positions {gap} to {gap_end - 1} are 0, "
            f"with real tokens before and after): LlamaMem is exact with left padding (pads before the first real "
            f"token) and with pads after the last; a pad between real tokens would take a real token's place in the "
            f"sliding window. Pad on the left (tokenizer.padding_side = 'left'); generate() or a cached step after "
            f"right padding puts the new tokens after the pads."
        )


def make_window_view(
    window: int,
    past,
    attention_mask,
    device,
    *,
    slots=None,
    length: int,
    decoding: bool,
    differentiable: bool,
    reads_memory: bool = True,
) -> WindowView:
    """Window bookkeeping for one call of T = `length` tokens. attention_mask is [B, past + T] (1 = real token,
    0 = padding) or None, already checked by the forward that calls this. slots: a fixed-shape cache's `fixed_slots`
    (then its W - 1 slots are the cached window whatever `past` is, and only the mask's last T columns are read)."""
    if slots is not None:
        token_valid = (
            None if attention_mask is None else attention_mask[:, -length:].to(device=device, dtype=torch.bool)
        )
        new = slots.new_ones(slots.shape[0], length) if token_valid is None else token_valid
        return WindowView(
            window, slots.shape[1], torch.cat([slots, new], dim=1), token_valid, decoding, differentiable, reads_memory
        )
    cached = min(past, window - 1)
    key_valid = None if attention_mask is None else attention_mask[:, past - cached :]
    if key_valid is None or known_unpadded(key_valid):
        return WindowView(window, cached, None, None, decoding, differentiable, reads_memory)
    key_valid = key_valid.to(device=device, dtype=torch.bool)
    return WindowView(window, cached, key_valid, key_valid[:, cached:], decoding, differentiable, reads_memory)


def positions_from_mask(attention_mask, past: int, length: int, device) -> torch.LongTensor:
    """Positions count real tokens only, so a left-padded row is computed exactly as the same row unpadded.

    Reads the whole mask, not just the window: padding that has left the window still shifts the positions."""
    if attention_mask is None or known_unpadded(attention_mask):
        if torch.is_tensor(past):  # a fixed-shape cache's token count, under torch.compile
            return (past + torch.arange(length, device=device))[None]
        return torch.arange(past, past + length, device=device)[None]
    positions = attention_mask.long().cumsum(-1) - 1
    return positions.clamp(min=0)[:, -length:].to(device)


# The keyword arguments of transformers' padding-free (packed) batches: DataCollatorWithFlattening's
# return_flash_attn_kwargs and return_seq_idx.
PACKED_SEQUENCE_KWARGS = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k", "seq_idx")
PACKED_SEQUENCES_UNSUPPORTED = (
    "packed sequences (several sequences in one row, as DataCollatorWithFlattening produces) are not supported: "
    "LlamaMem's window and memory would carry from one sequence into the next. Pad the batch instead "
    "(DataCollatorWithPadding, or DataCollatorForLanguageModeling); padded rows are exact."
)


def check_not_packed(position_ids, attention_mask, past: int, kwargs: dict) -> None:
    """Refuse a padding-free packed batch: varlen keyword arguments (cu_seq_lens_q, seq_idx, ...), or position_ids
    that do not increase by one from token to token of a row (a new sequence starts where they restart).

    position_ids [B or 1, T]; attention_mask [B, past + T] or None: with a mask only steps between real tokens count
    (pads may hold any position), and the mask is read on a CPU only. Without a mask, on a fresh input (past 0),
    the check runs on any device: one reduction read back by the host. That is the condition under which
    transformers' own masks look for packed sequences (`find_packed_sequence_indices`, which reads its answer back
    the same way in every such Llama forward), and what Trainer's padding-free batches are; with a mask or a cache
    (inference, generate()) an accelerator's positions are not read back. Under torch.compile the check is an
    assertion inside the graph (a RuntimeError with the same reason, where a host read would split the graph), and
    with a mask it is not made.
    """
    given = sorted(name for name in PACKED_SEQUENCE_KWARGS if kwargs.get(name) is not None)
    if given:
        raise ValueError(f"{PACKED_SEQUENCES_UNSUPPORTED} Got {', '.join(given)}.")
    if position_ids is None or position_ids.dim() != 2 or position_ids.shape[1] < 2:
        return
    on_cpu = position_ids.device.type == "cpu" and not torch.compiler.is_compiling()  # compiled: as on a device
    fresh = not torch.is_tensor(past) and past == 0  # a tensor: a compiled fixed-shape step, never fresh
    if attention_mask is None and (fresh or on_cpu):
        restarts = position_ids.diff(dim=-1) != 1
    elif attention_mask is not None and on_cpu and attention_mask.device.type == "cpu":
        real = attention_mask[:, -position_ids.shape[1] :].bool()
        restarts = (position_ids.diff(dim=-1) != 1) & real[:, 1:] & real[:, :-1]
    else:
        return
    if torch.compiler.is_compiling():
        # Inside the graph: an assertion the compiled code checks, where reading the answer back would split it.
        torch._assert_async(~restarts.any(), f"position_ids do not increase by one: {PACKED_SEQUENCES_UNSUPPORTED}")
        return
    if bool(restarts.any()):
        row, index = (int(i) for i in restarts.nonzero()[0])
        previous, restart = (int(p) for p in position_ids[min(row, position_ids.shape[0] - 1), index : index + 2])
        raise ValueError(
            f"position_ids do not increase by one in row {row} (position {restart} at index {index + 1} follows "
            f"{previous}): {PACKED_SEQUENCES_UNSUPPORTED}"
        )


def keep_owned_window(layer, window: int) -> None:
    """Keep exactly the last W - 1 tokens of a cache layer's window (WINDOW_TENSORS), in tensors the layer owns.

    The stock sliding-window layer keeps a view of everything passed to `update`, so after a long prefill the whole
    prefill stays pinned in memory; a copy of what is kept makes the cache size independent of the context length.
    """
    if isinstance(layer, FixedWindowLayer):  # it keeps its window in place as it updates
        return
    keep = window - 1
    for name in WINDOW_TENSORS:
        kept = getattr(layer, name, None)
        if kept is None:  # a layer without memory has no memory entries
            continue
        kept = kept[:, :, max(0, kept.shape[2] - keep) :]
        # A storage's size cannot be traced: under torch.compile the window is always copied (W - 1 tokens).
        if torch.compiler.is_compiling() or kept.untyped_storage().nbytes() > MAX_WINDOW_STORAGE_RATIO * kept.nbytes:
            kept = kept.clone()
        setattr(layer, name, kept)


class LlamaMemCacheLayer(LinearAttentionAndSlidingWindowAttentionLayer):
    """The cache of a memory layer ("hybrid_sliding"), with the attention window where transformers' code expects it.

    `keys` (after RoPE) and `values` (the attention values, v_proj's output) of the last W - 1 tokens, as in any
    sliding-window layer, so code that reads a layer's keys and values (cache quantization, compression tools) reads
    attention keys and values. The memory's own state beside them: `memory_entries` [B, Hkv, tokens, D + 2], float32,
    what each of the same tokens writes into the memory when it leaves the window (its memory key, log decay g and
    write strength beta; float32 because a log decay can lie below float16's range); `conv_states[0]`, the memory
    key convolution's last inputs; `recurrent_states[0]`, the memory matrix S (float32).

    `prepare_cache` puts one in place of each stock "hybrid_sliding" layer before its first use. Beam reordering,
    `batch_repeat_interleave` and `batch_select_indices` carry all of a row's state. A write into S cannot be
    undone, so `crop` (which only assisted decoding needs; the model is stateful, so generate() does not use it) is
    refused.
    """

    # The per-row tensors beside keys, values and the stock conv and recurrent states.
    ROW_TENSORS = ("memory_entries", "next_token_log_probs")

    def __init__(self, sliding_window: int, number_of_states: int = 1, **kwargs):
        super().__init__(sliding_window=sliding_window, number_of_states=number_of_states)
        self.memory_entries: torch.Tensor | None = None
        # With surprisal-gated writes, the first memory layer's also keeps the windowed model's log-probabilities
        # [B, vocab] for the next token and the windowed pass's own cache (surprisal_writes.py).
        self.next_token_log_probs: torch.Tensor | None = None
        self.windowed_cache: Cache | None = None

    def keep_next_token_log_probs(self, log_probs: torch.Tensor) -> None:
        """Keep the windowed model's log-probabilities of the next token [B, vocab] (surprisal_writes.py)."""
        self.next_token_log_probs = log_probs

    def update_memory_entries(self, entries: torch.Tensor) -> torch.Tensor:
        """Append this call's entries [B, Hkv, T, D + 2]; returns those of the cached window and this call, as
        `update` returns keys and values (`keep_owned_window` then trims the window to its last W - 1 tokens)."""
        if self.memory_entries is not None:
            entries = torch.cat([self.memory_entries, entries], dim=-2)
        self.memory_entries = entries
        return entries

    def _apply_to_row_states(self, function) -> None:
        """`function` on each per-row tensor beyond keys and values: memory entries, next-token log-probabilities, conv
        and recurrent states."""
        for name in self.ROW_TENSORS:
            if getattr(self, name) is not None:
                setattr(self, name, function(getattr(self, name)))
        for index in range(self.number_of_states):
            if self.is_conv_states_initialized[index]:
                self.conv_states[index] = function(self.conv_states[index])
            if self.is_recurrent_states_initialized[index]:
                self.recurrent_states[index] = function(self.recurrent_states[index])

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)  # keys, values, conv and recurrent states
        for name in self.ROW_TENSORS:
            tensor = getattr(self, name)
            if tensor is not None:
                setattr(self, name, tensor.index_select(0, beam_idx.to(tensor.device)))
        if self.windowed_cache is not None:
            self.windowed_cache.reorder_cache(beam_idx)

    def batch_repeat_interleave(self, repeats: int) -> None:
        super().batch_repeat_interleave(repeats)  # keys and values
        self._apply_to_row_states(lambda tensor: tensor.repeat_interleave(repeats, dim=0))
        if self.windowed_cache is not None:
            self.windowed_cache.batch_repeat_interleave(repeats)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        super().batch_select_indices(indices)  # keys and values
        self._apply_to_row_states(lambda tensor: tensor[indices.to(tensor.device)])
        if self.windowed_cache is not None:
            self.windowed_cache.batch_select_indices(indices)

    def reset(self) -> None:
        super().reset()
        self.memory_entries = self.next_token_log_probs = self.windowed_cache = None

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove == 0:
            return  # the window is always at its working size
        raise ValueError(
            f"A LlamaMem cache cannot be cropped (crop({tokens_to_remove})): the tokens that left the window are "
            f"already written into the memory matrix, and a write cannot be undone."
        )


# The cache layer type of a memory layer in config.layer_types (a layer without memory is "sliding_attention").
MEMORY_LAYER_TYPE = "hybrid_sliding"
FOREIGN = "A cache built for another configuration: "
FIX = (
    " Build the cache with DynamicCache(config=model.config) (or DynamicCache()) for this model, or for a compiled "
    "decode step StaticCache(config=model.config, max_cache_len=...)."
)


def layer_kind(layer) -> str:
    """What a cache layer is, in the words of the errors below."""
    if isinstance(layer, LlamaMemFixedLayer):
        return "a fixed-shape layer with memory (of a StaticCache)"
    if type(layer) is FixedWindowLayer:
        return "a fixed-shape layer without memory (of a StaticCache)"
    if isinstance(layer, (LlamaMemCacheLayer, LinearAttentionAndSlidingWindowAttentionLayer)):
        return "a sliding-window layer with memory"
    if type(layer) is DynamicSlidingWindowLayer:
        return "a sliding-window layer without memory"
    if type(layer) is DynamicLayer:
        return "a full-attention layer (DynamicLayer)"
    return f"a {type(layer).__name__}"


def prepare_cache(cache: Cache | None, config) -> Cache | None:
    """The cache a forward runs on, checked against `config` before anything is read or written.

    - A `DynamicCache()` built without a config and not used yet gets the layers `DynamicCache(config=config)` builds.
    - Each stock "hybrid_sliding" layer not used yet becomes a `LlamaMemCacheLayer`.
    - A StaticCache (generate's cache_implementation="static", transformers' way of asking for a compiled decode
      step) gets fixed-shape layers in place of its stock ones not used yet (fixed_cache.py): `FixedWindowLayer` and
      `LlamaMemFixedLayer`, W - 1 slots each whatever its max_cache_len.
    - A cache built for another configuration (another layer count, window, memory layers, or layer types, such as
      a full-attention Llama cache) is refused by name, with what differs.

    The check reads the layers' types and windows only (no tensor, so no device sync), every forward: under 10
    microseconds for 30 layers (measured on one busy CPU core). It cannot tell a cache filled by a model of the same
    configuration but other weights: that cache continues with the other model's state. Memory files carry a weight
    fingerprint, which `load_memory` checks.
    """
    if cache is None:
        return None
    # Read once: a config's attribute lookups cost microseconds each, and this runs every decode step.
    window, layer_types = config.sliding_window, config.layer_types  # layer_types: validated against memory_layers
    layers = cache.layers
    if not layers and getattr(cache, "layer_class_to_replicate", None) is not None:
        # `DynamicCache()`: its layers would be added one by one as full-attention layers; give it ours instead.
        cache.layers = layers = [
            LlamaMemCacheLayer(sliding_window=window)
            if kind == MEMORY_LAYER_TYPE
            else DynamicSlidingWindowLayer(sliding_window=window)
            for kind in layer_types
        ]
        cache.layer_class_to_replicate = None
    if len(layers) != len(layer_types):
        raise ValueError(f"{FOREIGN}the cache has {len(layers)} layers, but this model has {len(layer_types)}.{FIX}")
    fixed = isinstance(cache, StaticCache)
    classes, stock = LAYER_CLASSES[fixed], STOCK_LAYERS[fixed]
    for index, (layer, kind) in enumerate(zip(layers, layer_types, strict=True)):
        memory = kind == MEMORY_LAYER_TYPE
        expected = classes[memory]
        if type(layer) is not expected and type(layer) in stock[memory] and not _used(layer):
            # A dynamic layer keeps the window it was built for (checked below); a static one keeps
            # min(window, max_cache_len) slots, which does not say its window: it gets this model's.
            layer = layers[index] = expected(sliding_window=getattr(layer, "sliding_window", window))
        if type(layer) is not expected:
            needs = "has a memory" if memory else "has no memory"
            raise ValueError(
                f"{FOREIGN}cache layer {index} is {layer_kind(layer)}, but this model's layer {index} {needs}.{FIX}"
            )
        if layer.sliding_window != window:
            raise ValueError(
                f"{FOREIGN}cache layer {index} has sliding_window={layer.sliding_window}, but this model's window is "
                f"{window}.{FIX}"
            )
    return cache


def fixed_slots(cache: Cache | None) -> torch.Tensor | None:
    """Which window slots of a fixed-shape cache hold a real token, [B, W - 1] (every layer's are the same: the first
    layer's stand for all), or None for a dynamic cache, or a fixed one before its first call."""
    layer = cache.layers[0] if cache is not None and cache.layers else None
    return layer.valid if isinstance(layer, FixedWindowLayer) and layer.is_initialized else None


# By fixed-shape cache (a StaticCache) or not, the layer class of a layer (without, with memory), and the stock
# transformers layers it replaces while they are unused: what DynamicCache(config=...) and StaticCache(config=...)
# build for "sliding_attention" and "hybrid_sliding" (a DynamicCache's DynamicSlidingWindowLayer is already the class).
LAYER_CLASSES = {
    False: (DynamicSlidingWindowLayer, LlamaMemCacheLayer),
    True: (FixedWindowLayer, LlamaMemFixedLayer),
}
STOCK_LAYERS = {
    False: ((), (LinearAttentionAndSlidingWindowAttentionLayer,)),
    True: ((StaticSlidingWindowLayer,), (LinearAttentionAndStaticSlidingWindowAttentionLayer,)),
}


def _used(layer) -> bool:
    """Whether a stock layer holds any state (then it was filled by something else, and is not replaced)."""
    return (
        layer.is_initialized
        or any(getattr(layer, "is_conv_states_initialized", {}).values())
        or any(getattr(layer, "is_recurrent_states_initialized", {}).values())
    )
