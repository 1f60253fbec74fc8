"""Chunked memory op vs the reference recurrence, forward and forward+backward, across lengths and chunk sizes.

Usage: python benchmarks/bench_memory_ops.py [--lengths 512 2048 8192] [--chunk-sizes 32 64 128]
Prints a markdown table of milliseconds and the speed-up of the chunked form.
"""

import argparse
import time

import torch
import torch.nn.functional as F

from hf_llama_mem.memory_ops import chunk_gated_delta_rule, recurrent_gated_delta_rule


def inputs(length, heads=2, groups=4, dim=64):
    q = F.normalize(torch.randn(1, length, heads * groups, dim), dim=-1).requires_grad_()
    k = F.normalize(torch.randn(1, length, heads, dim), dim=-1).requires_grad_()
    v = torch.randn(1, length, heads, dim).requires_grad_()
    g = (-torch.rand(1, length, heads) * 0.1).requires_grad_()
    beta = torch.rand(1, length, heads).requires_grad_()
    return q, k, v, g, beta


def timed(fn, repeats):
    fn()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats * 1e3


def measure(op, length, backward, repeats, **kwargs):
    q, k, v, g, beta = inputs(length)

    def run():
        out, _ = op(q, k, v, g=g, beta=beta, scale=1.0, **kwargs)
        if backward:
            out.sum().backward()

    if backward:
        return timed(run, repeats)
    with torch.no_grad():
        return timed(run, repeats)


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--lengths", type=int, nargs="+", default=[512, 2048, 8192])
    parser.add_argument("--chunk-sizes", type=int, nargs="+", default=[32, 64, 128])
    args = parser.parse_args()
    print(
        "| T | pass | recurrent ms | " + " | ".join(f"chunk {c} ms" for c in args.chunk_sizes) + " | best speed-up |"
    )
    print("|---|---|---|" + "---|" * len(args.chunk_sizes) + "---|")
    for length in args.lengths:
        for backward in (False, True):
            reference = measure(recurrent_gated_delta_rule, length, backward, repeats=1)
            chunked = [measure(chunk_gated_delta_rule, length, backward, 3, chunk_size=c) for c in args.chunk_sizes]
            cells = " | ".join(f"{ms:.1f}" for ms in chunked)
            print(
                f"| {length} | {'fwd+bwd' if backward else 'fwd'} | {reference:.1f} | {cells} | "
                f"{reference / min(chunked):.1f}x |",
                flush=True,
            )


if __name__ == "__main__":
    main()
