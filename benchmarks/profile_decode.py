"""Where LlamaMem's decode step spends its time beyond Llama's: an elimination profile at one context length.

    python benchmarks/profile_decode.py [--length 1024] [--threads 1] [--steps 30]

The bench's dims (W = 1024). The same decode step is timed four ways, taking turns with transformers' Llama step by
step (`hf_llama_mem.bench.decode_ms`): as it is; with the memory's write entries replaced by zeros of their shape
(no key convolution, normalisation, write strength or decay); with its read replaced by zeros (no S^T q, no
delta-rule write of the leaving token, no read norm); and with both. The outputs of the replaced steps are wrong:
this measures time only. Prints one markdown row per variant.
"""

import argparse
import contextlib

import torch

from hf_llama_mem import memory_layer
from hf_llama_mem.bench import FULL, build, decode_ms, prefill


def zero_entries(self, hidden_states, key, value, view, layer_cache):
    return key.new_zeros(*key.shape[:3], 2 * self.head_dim + 2, dtype=torch.float32)


def zero_read(self, hidden_states, query, window_values, window_entries, view, layer_cache):
    return query.new_zeros(query.shape[0], query.shape[2], query.shape[1], query.shape[3], dtype=torch.float32)


@contextlib.contextmanager
def replaced(entries, read):
    memory = memory_layer.LlamaMemMemory
    saved = memory.entries, memory.read
    memory.entries, memory.read = entries or saved[0], read or saved[1]
    try:
        yield
    finally:
        memory.entries, memory.read = saved


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--length", type=int, default=1024, help="tokens of context before the decode steps")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--steps", type=int, default=30, help="decode steps per variant (the median is reported)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    models = build(FULL)
    runs = {name: (model, prefill(model, args.length)[2]) for name, model in models.items()}
    variants = {
        "as it is": (None, None),
        "write entries replaced": (zero_entries, None),
        "read replaced": (None, zero_read),
        "both replaced": (zero_entries, zero_read),
    }
    print(f"| decode @ {args.length}, {args.threads} thread(s) | LlamaMem ms | Llama ms | ratio |")
    print("|---|---|---|---|")
    for name, (entries, read) in variants.items():
        with replaced(entries, read):
            ms = decode_ms(runs, steps=args.steps)
        print(f"| {name} | {ms['llama_mem']:.2f} | {ms['llama']:.2f} | {ms['llama_mem'] / ms['llama']:.2f}x |")


if __name__ == "__main__":
    main()
