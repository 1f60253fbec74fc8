"""Writes gated by surprisal (config.memory_write_surprisal_threshold): a token writes into the memory only if the
windowed model (the same weights, every memory off: the model the conversion started from) found it surprising,
-log p(token | the tokens before it) > T.

Why the windowed model's surprisal, not the model's own: on SmolLM2 with the shipped delta, gated by its own
surprisal the memory read makes the haystack less predictable, more of it writes, and a passkey at 8K depth 0.5 is
lost (answer loss 1.75); gated by the windowed model's it is found (0.12; README, "Long context from a pretrained
Llama"). It costs a second pass of the decoder, without memory, over every token.

Why it is causal and exact: token t writes when it leaves the window, at step t + W, and its surprisal is known at
step t. The forward runs in pieces of at most W - 1 tokens, each through the windowed pass (its own cache, kept
inside the main one) and then the model: after each piece, the write strength of its tokens, still in the cache's
window, is zeroed where the surprisal is at most T; the tokens that leave the window during a piece are all from
earlier pieces. A piece split is exact, so one forward equals chunked prefill plus decode here too. The first token
of a call takes its surprisal from the windowed log-probabilities the previous call left in the cache (the first
memory layer's `next_token_log_probs`, a per-row state that beam search reorders); a token with no prediction before
it (a sequence's first, the first real token after left padding) writes nothing.
"""

import torch
from transformers.cache_utils import DynamicCache, StaticCache

from .fixed_cache import FixedWindowLayer
from .windowed_attention import prepare_cache

__all__ = ["gate_state_layer", "surprisal_gated_forward"]


def memory_cache_layers(cache) -> list:
    return [layer for layer in cache.layers if hasattr(layer, "memory_entries")]


def gate_state_layer(cache):
    """The cache layer that keeps the gate's state (the windowed pass's cache and its last prediction): the first
    memory layer, or None in a cache without one."""
    return next(iter(memory_cache_layers(cache)), None)


def new_windowed_cache(cache, config):
    """The windowed pass's own cache, of the main cache's kind: beside a fixed-shape cache (StaticCache, compiled
    decoding) a fixed-shape one, W - 1 slots in every layer, so that a compiled step keeps every shape and address."""
    if not isinstance(cache, StaticCache):
        return DynamicCache()
    windowed = StaticCache(config=config, max_cache_len=config.sliding_window)
    windowed.layers = [FixedWindowLayer(sliding_window=config.sliding_window) for _ in windowed.layers]
    return windowed


def surprisal_gated_forward(lm, input_ids, attention_mask, position_ids, cache, use_cache, output_hidden_states, keep):
    """LlamaMemForCausalLM's decoder and LM head with surprisal-gated writes.

    Returns the logits of the positions `keep` selects (LlamaMemForCausalLM's `logits_to_keep` as an int k > 0, the
    last k; 0, all; or an index tensor), the hidden states of every layer when asked (else None) and the cache (None
    unless one was given or use_cache)."""
    config = lm.config
    if input_ids is None:
        raise ValueError(
            "memory_write_surprisal_threshold gates each token's write by its surprisal, which needs input_ids "
            "(got inputs_embeds)."
        )
    if lm.model.gradient_checkpointing and lm.training and torch.is_grad_enabled():
        raise ValueError(
            "memory_write_surprisal_threshold runs the forward in pieces through a cache, which gradient "
            "checkpointing cannot replay: disable one of them."
        )
    use_cache = use_cache if use_cache is not None else (config.use_cache and not lm.training)
    returned = cache is not None or use_cache
    cache = prepare_cache(cache if cache is not None else DynamicCache(config=config), config)
    threshold = config.memory_write_surprisal_threshold
    length = input_ids.shape[1]
    piece = config.sliding_window - 1
    first_kept = length - keep if isinstance(keep, int) and keep > 0 else 0
    # The first memory layer's cache layer keeps the windowed pass's cache and its last prediction (gate_state_layer).
    memory_layers = memory_cache_layers(cache)
    if memory_layers and memory_layers[0].windowed_cache is None:
        memory_layers[0].windowed_cache = new_windowed_cache(cache, config)
    kept_logits, hidden_pieces = [], []
    for start in range(0, max(length, 1), piece):
        end = min(start + piece, length)
        # The mask [B, past + T] up to the piece's end, cut by its width: no read of the cache's token count, which
        # in a fixed-shape cache is a tensor (a host read would break a compiled step's graph).
        mask = None if attention_mask is None else attention_mask[:, : attention_mask.shape[1] - length + end]
        inputs = dict(
            input_ids=input_ids[:, start:end],
            attention_mask=mask,
            position_ids=None if position_ids is None else position_ids[:, start:end],
            use_cache=True,
            return_dict=True,
            surprisal_gated=True,
        )
        windowed_logits = None
        if memory_layers:
            with torch.no_grad():  # the gate is a decision, not a function to differentiate
                windowed = lm.model(**inputs, cache=memory_layers[0].windowed_cache, windowed_pass=True)
                windowed_logits = lm.lm_head(windowed.last_hidden_state)
        outputs = lm.model(**inputs, cache=cache, output_hidden_states=output_hidden_states)
        if memory_layers:
            gate_writes(memory_layers, input_ids[:, start:end], windowed_logits, mask, threshold)
        if end > first_kept:  # the LM head only where logits are kept (a prefill keeps its last position's)
            kept_logits.append(lm.lm_head(outputs.last_hidden_state[:, max(first_kept - start, 0) :]))
        if output_hidden_states:
            hidden_pieces.append(outputs.hidden_states)
    logits = torch.cat(kept_logits, dim=1)
    if not isinstance(keep, int):
        logits = logits[:, keep]
    hidden_states = None
    if output_hidden_states:
        hidden_states = tuple(torch.cat(states, dim=1) for states in zip(*hidden_pieces, strict=True))
    return logits, hidden_states, cache if returned else None


def gate_writes(memory_layers, input_ids, logits, attention_mask, threshold: float) -> None:
    """Zero the write strength of the tokens of one piece (the last T' of every memory layer's cached window) whose
    surprisal under the windowed model is at most `threshold`, and keep the piece's last prediction for the next
    piece or call.

    input_ids [B, T'], logits [B, T', vocab] (the windowed pass's); attention_mask [B, past + T'] (up to the piece's
    last token) or None."""
    if input_ids.shape[1] == 0:
        return
    with torch.no_grad():
        surprisal, log_probs = piece_surprisal(memory_layers, input_ids, logits)
        writes = (surprisal > threshold) & predicted(attention_mask, input_ids.shape[1])
    scale_write_strength(memory_layers, writes)
    memory_layers[0].keep_next_token_log_probs(log_probs[:, -1].detach())


def piece_surprisal(memory_layers, input_ids, logits) -> tuple[torch.Tensor, torch.Tensor]:
    """-log p of each token of a piece under the windowed model [B, T'] (its first from the prediction the cache
    kept), and the piece's log-probabilities [B, T', vocab]."""
    log_probs = logits.float().log_softmax(-1)
    inner = -log_probs[:, :-1].gather(-1, input_ids[:, 1:, None])[..., 0]
    before = memory_layers[0].next_token_log_probs  # None exactly when nothing came before (position 0)
    if before is None:  # no prediction of the first token: surprisal 0, it writes nothing (T >= 0)
        first = inner.new_zeros(input_ids.shape[0], 1)
    else:  # (a fixed-shape cache after reset() holds zeros: surprisal 0 again)
        first = -before.gather(-1, input_ids[:, :1])
    return torch.cat([first, inner], dim=1), log_probs


def predicted(attention_mask, tokens: int) -> torch.Tensor | bool:
    """Which of a piece's last `tokens` tokens had a real token before them [B, T'] (True without a mask): a
    prediction made at a padded position predicts nothing."""
    if attention_mask is None:
        return True
    previous = attention_mask[:, -tokens - 1 : -1]  # the mask of each token's predecessor
    if previous.shape[1] < tokens:  # the piece starts the sequence: its first token has none
        previous = torch.cat([previous.new_zeros(previous.shape[0], 1), previous], dim=1)
    return previous.bool()


def scale_write_strength(memory_layers, writes: torch.Tensor) -> None:
    """Zero the write strength beta of the piece's tokens where `writes` [B, T'] is False, in every memory layer."""
    tokens = writes.shape[1]
    for layer in memory_layers:
        entries = layer.memory_entries  # [B, Hkv, window tokens, D + 2]: ... g, beta
        scale = writes.to(entries.dtype)[:, None, :, None]
        if entries.requires_grad:  # a forward that records gradients: a new tensor, the old one may be saved
            beta = entries[:, :, -tokens:, -1:] * scale
            kept = torch.cat([entries[:, :, -tokens:, :-1], beta], dim=-1)
            layer.memory_entries = torch.cat([entries[:, :, :-tokens], kept], dim=2)
        else:
            entries[:, :, -tokens:, -1:] *= scale
