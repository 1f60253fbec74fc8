"""The cache layers of a fixed-shape decode step: every tensor keeps its shape and its address from the first call on.

LlamaMem's cache is bounded whatever the length (W - 1 window tokens and one memory matrix per layer), but the
dynamic layers grow their window until it is full and build new tensors every step. A compiled decode step needs the
same shapes at every step, and CUDA graphs (torch.compile's mode="reduce-overhead") need tensors that stay where they
are. These layers keep W - 1 slots from the first call on and write every step into them in place, with a mask of the
slots that hold a real token (a slot is empty before W - 1 tokens have been read, or holds padding). An empty slot is
attended by nobody and writes nothing when it leaves the window (its memory entry is a no-op write, g = 0 and beta =
0), so the results are those of the dynamic cache exactly; the token count is a tensor too, so that a step takes no
Python value that changes from step to step (a new one would recompile, or record a new CUDA graph, every step).

They are what a transformers `StaticCache` holds once `prepare_cache` has seen it: `generate(...,
cache_implementation="static")`, transformers' way of asking for a compiled decode step, builds one.
"""

import torch
from transformers.cache_utils import CacheLayerMixin, LinearAttentionLayer
from transformers.utils import is_torchdynamo_compiling

__all__ = ["FixedWindowLayer", "LlamaMemFixedLayer"]

CROP_REFUSED = (
    "A LlamaMem cache cannot be cropped: the tokens that left the window are already written into the memory "
    "matrix, and a write cannot be undone."
)


def shift_in(slots: torch.Tensor, full: torch.Tensor, dim: int) -> None:
    """Write the last slots' worth of `full` (the slots followed by this call's tokens, or a first call's tokens
    alone) into `slots` in place, right-aligned: the oldest slot is the first to leave the window."""
    size = slots.shape[dim]
    kept = min(size, full.shape[dim])
    slots.narrow(dim, size - kept, kept).copy_(full.narrow(dim, full.shape[dim] - kept, kept))


def mark_static(*tensors: torch.Tensor) -> None:
    """Tell torch.compile that these tensors keep their address (CUDA graphs then read and write them where they
    are); not possible, nor needed, while tracing."""
    if not is_torchdynamo_compiling():
        for tensor in tensors:
            torch._dynamo.mark_static_address(tensor)


class FixedWindowLayer(CacheLayerMixin):
    """The window of a layer without memory: keys and values [B, Hkv, W - 1, D] (after RoPE), `valid` [B, W - 1] (the
    slots that hold a real token), and `seen`, the tokens read (a 0-dim tensor)."""

    is_compileable = True
    is_sliding = True

    def __init__(self, sliding_window: int, **kwargs):
        super().__init__()
        self.sliding_window = sliding_window
        self.valid: torch.Tensor | None = None
        self.seen: torch.Tensor | None = None

    @property
    def is_croppable(self) -> bool:
        return False

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        batch, heads = key_states.shape[:2]
        slots = self.sliding_window - 1
        self.device = key_states.device
        self.keys = key_states.new_zeros(batch, heads, slots, key_states.shape[-1])
        self.values = value_states.new_zeros(batch, heads, slots, value_states.shape[-1])
        self.valid = torch.zeros(batch, slots, dtype=torch.bool, device=self.device)
        self.seen = torch.zeros((), dtype=torch.long, device=self.device)
        mark_static(self.keys, self.values, self.valid, self.seen)
        self.is_initialized = True

    def update(self, key_states, value_states, *args, token_valid=None, **kwargs):
        """Take this call's keys and values [B, Hkv, T, D] (`token_valid` [B, T]: its real tokens, None when all
        are); returns the window's followed by this call's, as a sliding-window layer does."""
        if self.is_initialized:
            full_keys = torch.cat([self.keys, key_states], dim=-2)
            full_values = torch.cat([self.values, value_states], dim=-2)
        else:
            self.lazy_initialization(key_states, value_states)
            full_keys, full_values = key_states, value_states
        if token_valid is None:
            token_valid = self.valid.new_ones(key_states.shape[0], key_states.shape[-2])
        shift_in(self.valid, torch.cat([self.valid, token_valid.bool()], dim=-1), dim=-1)
        shift_in(self.keys, full_keys, dim=-2)
        shift_in(self.values, full_values, dim=-2)
        self.seen.add_(key_states.shape[-2])
        return full_keys, full_values

    def get_seq_length(self) -> int:
        """The tokens read (a host read of the counter: not for the compiled step itself)."""
        return int(self.seen) if self.is_initialized else 0

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.sliding_window - 1 + query_length, 0

    def get_max_length(self) -> int:
        return self.sliding_window

    def window_tensors(self) -> list[torch.Tensor]:
        """Every per-row tensor of the window (what beam search reorders)."""
        return [self.keys, self.values, self.valid]

    def reset(self) -> None:
        """Empty, in place: every slot empty again, nothing read."""
        if self.is_initialized:
            for tensor in (*self.window_tensors(), self.seen):
                tensor.zero_()

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        if self.is_initialized:
            for tensor in self.window_tensors():
                tensor.copy_(tensor.index_select(0, beam_idx.to(tensor.device)))  # in place: the address stays

    def _rebuild_rows(self, function) -> None:
        """Replace every per-row tensor by `function` of it (a new batch size, so new tensors)."""
        self.keys, self.values, self.valid = (function(tensor) for tensor in (self.keys, self.values, self.valid))
        mark_static(self.keys, self.values, self.valid)

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.is_initialized:
            self._rebuild_rows(lambda tensor: tensor.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.is_initialized:
            self._rebuild_rows(lambda tensor: tensor[indices.to(tensor.device)])

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove:
            raise ValueError(CROP_REFUSED)


class LlamaMemFixedLayer(LinearAttentionLayer, FixedWindowLayer):
    """The fixed-shape twin of `LlamaMemCacheLayer` (a memory layer's cache): the window's keys, values and validity,
    the memory entries of the same slots [B, Hkv, W - 1, D + 2] (float32; zeros in an empty slot: a no-op write),
    the key-convolution state and the memory matrix, all written in place. With surprisal-gated writes the first
    memory layer's also keeps the windowed model's next-token log-probabilities [B, vocab] (in place) and the
    windowed pass's own fixed-shape cache (surprisal_writes.py)."""

    def __init__(self, sliding_window: int, number_of_states: int = 1, **kwargs):
        FixedWindowLayer.__init__(self, sliding_window=sliding_window)
        LinearAttentionLayer.__init__(self, number_of_states=number_of_states)
        self.memory_entries: torch.Tensor | None = None
        self.next_token_log_probs: torch.Tensor | None = None
        self.windowed_cache = None

    def keep_next_token_log_probs(self, log_probs: torch.Tensor) -> None:
        if self.next_token_log_probs is None:
            self.next_token_log_probs = log_probs.clone()
            mark_static(self.next_token_log_probs)
        else:
            self.next_token_log_probs.copy_(log_probs)

    @property
    def is_compileable(self) -> bool:
        return True

    @property
    def is_croppable(self) -> bool:
        return False

    def lazy_initialization(self, *args, **kwargs) -> None:
        # Called with (keys, values) by `update`, with keyword states by the conv and recurrent state updates.
        if args:
            FixedWindowLayer.lazy_initialization(self, *args)
        else:
            LinearAttentionLayer.lazy_initialization(self, **kwargs)

    def update_memory_entries(self, entries: torch.Tensor) -> torch.Tensor:
        """Take this call's entries [B, Hkv, T, D + 2]; returns the window's followed by this call's."""
        if self.memory_entries is None:
            self.memory_entries = entries.new_zeros(*entries.shape[:2], self.sliding_window - 1, entries.shape[-1])
            mark_static(self.memory_entries)
            full = entries
        else:
            full = torch.cat([self.memory_entries, entries], dim=-2)
        shift_in(self.memory_entries, full, dim=-2)
        return full

    def row_states(self) -> list[torch.Tensor]:
        states = [self.conv_states[0], self.recurrent_states[0], self.next_token_log_probs]
        return [state for state in states if state is not None]

    def window_tensors(self) -> list[torch.Tensor]:
        entries = [] if self.memory_entries is None else [self.memory_entries]
        return [*FixedWindowLayer.window_tensors(self), *entries]

    def reset(self) -> None:
        FixedWindowLayer.reset(self)
        LinearAttentionLayer.reset(self)  # zeros the states in place, no previous conv state
        if self.next_token_log_probs is not None:  # zeros: the next first token has surprisal 0, as with none
            self.next_token_log_probs.zero_()
        if self.windowed_cache is not None:
            self.windowed_cache.reset()

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        FixedWindowLayer.reorder_cache(self, beam_idx)
        for state in self.row_states():
            state.copy_(state.index_select(0, beam_idx.to(state.device)))
        if self.windowed_cache is not None:
            self.windowed_cache.reorder_cache(beam_idx)

    def _rebuild_rows(self, function) -> None:
        FixedWindowLayer._rebuild_rows(self, function)
        for name in ("memory_entries", "next_token_log_probs"):
            if getattr(self, name) is not None:
                setattr(self, name, function(getattr(self, name)))
                mark_static(getattr(self, name))
        for states in (self.conv_states, self.recurrent_states):
            if states[0] is not None:
                states[0] = function(states[0])
                mark_static(states[0])

    def batch_repeat_interleave(self, repeats: int) -> None:
        FixedWindowLayer.batch_repeat_interleave(self, repeats)
        if self.windowed_cache is not None:
            self.windowed_cache.batch_repeat_interleave(repeats)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        FixedWindowLayer.batch_select_indices(self, indices)
        if self.windowed_cache is not None:
            self.windowed_cache.batch_select_indices(indices)

    def get_max_length(self) -> int:
        return FixedWindowLayer.get_max_length(self)

    def crop(self, tokens_to_remove: int) -> None:
        FixedWindowLayer.crop(self, tokens_to_remove)
