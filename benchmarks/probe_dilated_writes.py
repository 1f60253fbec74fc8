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
    """surprisal_writes.gate_writes, its decision dilated by one token on each side."""
    if input_ids.shape[1] == 0:
        return
    with torch.no_grad():
        surprisal, log_probs = surprisal_writes.piece_surprisal(memory_layers, input_ids, logits)
        if memory_layers[0].next_token_log_probs is None:  # a new sequence
            last_decision.clear()
        own = surprisal > threshold
        writes = own.clone()
        writes[:, 1:] |= own[:, :-1]
        writes[:, :1] |= last_decision.get("own", own.new_zeros(own.shape[0], 1))
        writes[:, :-1] |= own[:, 1:]
        last_decision["own"] = own[:, -1:]
        writes &= surprisal_writes.predicted(attention_mask, input_ids.shape[1])
    surprisal_writes.scale_write_strength(memory_layers, writes)
    memory_layers[0].keep_next_token_log_probs(log_probs[:, -1])


if __name__ == "__main__":
    surprisal_writes.gate_writes = dilated_gate_writes
    main(sys.argv[1:])
