"""Decode ms/token at 1K and 4K of context, eager and compiled, LlamaMem against transformers' Llama (the bench's dims,
W = 1024): the decode rows of `hf-llama-mem bench --compile` without its training and prefill rows, for a quick look.

    python benchmarks/bench_decode_compiled.py [--model smollm2|FOLDER] [--json decode_compiled.json]

Eager decodes on a DynamicCache, compiled ones (torch.compile, inductor, static shapes) on a StaticCache; each pair
takes turns step by step (`hf_llama_mem.bench.decode_ms`), so a slow spell of a shared machine hits both.
"""

import argparse
import json

import torch

from hf_llama_mem.bench import (
    FULL,
    RECOMPILE_LIMIT,
    build,
    compiled,
    decode_ms,
    prefill,
    static_cache_after_prefill,
    with_model_shape,
)

LENGTHS = (1024, 4096)


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="'smollm2' or a model folder (its shape); default: the bench's")
    parser.add_argument("--json", default="decode_compiled.json")
    args = parser.parse_args()
    models = build(with_model_shape(FULL, args.model))
    results = {}
    with torch._dynamo.config.patch(recompile_limit=RECOMPILE_LIMIT):
        for length in LENGTHS:
            eager = {name: (model, prefill(model, length)[2]) for name, model in models.items()}  # DynamicCache
            static = {
                name: (compiled(model), static_cache_after_prefill(model, length)) for name, model in models.items()
            }
            results[length] = {"eager": decode_ms(eager), "compiled": decode_ms(static)}
            for kind, ms in results[length].items():
                ratio = ms["llama_mem"] / ms["llama"]
                row = f"| decode ms/token @ {length}, {kind} | {ms['llama_mem']:.2f} | {ms['llama']:.2f}"
                print(f"{row} | {ratio:.2f}x |")
    with open(args.json, "w") as handle:
        json.dump(results, handle, indent=1)


if __name__ == "__main__":
    main()
