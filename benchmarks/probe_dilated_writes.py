"""Surprisal-gated writes dilated by one token on each side: does writing the neighbours of every surprising token
(the digit of a number that the windowed model found likely, the period after it) help an evaluation?

    python benchmarks/probe_dilated_writes.py eval chat-recall --model MODEL_FOLDER --windows-back 8
    python benchmarks/probe_dilated_writes.py extend smollm2 OUT --memory-write-surprisal-threshold 2 ...

Runs any `hf-llama-mem` command in this process with the gate's decision widened: token t writes if the windowed
model's surprisal of t - 1, t or t + 1 exceeds the threshold. The backward neighbour is carried across the forward's
pieces; the forward one is not (the last token of each piece of W - 1 keeps its own decision), so on a long prompt
about 1 token in W - 1 is decided undilated. A probe for a design question, not an exact model: decoding a token at
a time, no token gets its forward neighbour.
"""

import sys

import torch

import hf_llama_mem.surprisal_writes as surprisal_writes
from hf_llama_mem.cli import main

last_decision = {}  # the previous piece's last token's own decision, per call sequence


def dilated_gate_writes(memory_layers, input_ids, logits, attention_mask, threshold):
    tokens = input_ids.shape[1]
    if tokens == 0:
        return
    with torch.no_grad():
        log_probs = logits.float().log_softmax(-1)
        inner = -log_probs[:, :-1].gather(-1, input_ids[:, 1:, None])[..., 0]
        before = memory_layers[0].next_token_log_probs
        first = inner.new_zeros(input_ids.shape[0], 1) if before is None else -before.gather(-1, input_ids[:, :1])
        own = torch.cat([first, inner], dim=1) > threshold
        if before is None:
            last_decision.clear()
        writes = own.clone()
        writes[:, 1:] |= own[:, :-1]
        writes[:, :1] |= last_decision.get("own", own.new_zeros(own.shape[0], 1))
        writes[:, :-1] |= own[:, 1:]
        last_decision["own"] = own[:, -1:]
        if attention_mask is not None:
            previous = attention_mask[:, -tokens - 1 : -1]
            if previous.shape[1] < tokens:
                previous = torch.cat([previous.new_zeros(previous.shape[0], 1), previous], dim=1)
            writes &= previous.bool()
    for layer in memory_layers:
        entries = layer.memory_entries
        scale = writes.to(entries.dtype)[:, None, :, None]
        if entries.requires_grad:  # training (`extend`): a new tensor, as surprisal_writes.gate_writes does
            kept = torch.cat([entries[:, :, -tokens:, :-1], entries[:, :, -tokens:, -1:] * scale], dim=-1)
            layer.memory_entries = torch.cat([entries[:, :, :-tokens], kept], dim=2)
        else:
            entries[:, :, -tokens:, -1:] *= scale
    memory_layers[0].keep_next_token_log_probs(log_probs[:, -1])


if __name__ == "__main__":
    surprisal_writes.gate_writes = dilated_gate_writes
    main(sys.argv[1:])
