"""LlamaMem vs transformers' LlamaForCausalLM with identical dimensions, in one process, fp32 on the CPU.

Reports training tokens/s, prefill tokens/s, decode ms/token, cache bytes, peak memory and training MFU against a
matmul peak measured on the same machine, as ratios LlamaMem / Llama. Writes JSON and prints a markdown table.
Usage: python benchmarks/bench_vs_llama.py [--quick] [--json results.json]
"""

import argparse
import json
import resource
import time

import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

from hf_llama_mem import LlamaMemConfig, LlamaMemForCausalLM

FULL = dict(
    train=[2048, 8192],
    prefill=[16384, 32768],
    decode=[1024, 16384, 32768],
    window=1024,
    dims=dict(
        hidden_size=512,
        num_hidden_layers=8,
        num_attention_heads=8,
        num_key_value_heads=2,
        intermediate_size=1408,
        vocab_size=32000,
    ),
)
QUICK = dict(
    train=[1024, 4096],
    prefill=[8192],
    decode=[512, 8192],
    window=256,
    dims=dict(
        hidden_size=256,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=704,
        vocab_size=32000,
    ),
)


def build(settings):
    torch.manual_seed(0)
    mem = LlamaMemForCausalLM(LlamaMemConfig(**settings["dims"], sliding_window=settings["window"])).eval()
    llama = LlamaForCausalLM(LlamaConfig(**settings["dims"])).eval()
    return {"llama_mem": mem, "llama": llama}


def train_tokens_per_s(model, length):
    model.train()
    ids = torch.randint(0, model.config.vocab_size, (1, length))
    model(ids, labels=ids).loss.backward()  # warm-up
    start = time.perf_counter()
    model(ids, labels=ids).loss.backward()
    model.zero_grad(set_to_none=True)
    model.eval()
    return length / (time.perf_counter() - start)


@torch.no_grad()
def prefill(model, length):
    cache = DynamicCache(config=model.config)
    ids = torch.randint(0, model.config.vocab_size, (1, length))
    start = time.perf_counter()
    model(ids, cache=cache, use_cache=True, logits_to_keep=1)
    return length / (time.perf_counter() - start), cache


@torch.no_grad()
def decode_ms(model, cache, steps=16):
    token = torch.randint(0, model.config.vocab_size, (1, 1))
    model(token, cache=cache, use_cache=True)
    start = time.perf_counter()
    for _ in range(steps):
        model(token, cache=cache, use_cache=True)
    return (time.perf_counter() - start) / steps * 1e3


def cache_bytes(cache):
    total = 0
    for layer in cache.layers:
        for name in ("keys", "values"):
            tensor = getattr(layer, name, None)
            total += tensor.numel() * tensor.element_size() if tensor is not None else 0
        for states in (getattr(layer, "conv_states", {}), getattr(layer, "recurrent_states", {})):
            total += sum(t.numel() * t.element_size() for t in states.values() if t is not None)
    return total


def matmul_peak_flops(size=2048, repeats=5):
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * size**3 * repeats / (time.perf_counter() - start)


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="smaller model and lengths (a few minutes)")
    parser.add_argument("--json", default="bench_vs_llama.json")
    args = parser.parse_args()
    settings = QUICK if args.quick else FULL
    models = build(settings)
    results = {"settings": settings, "matmul_peak_gflops": matmul_peak_flops() / 1e9, "rows": []}

    def add(metric, values, higher_is_better):
        ratio = values["llama_mem"] / values["llama"]
        results["rows"].append({"metric": metric, **values, "ratio": ratio, "higher_is_better": higher_is_better})
        print(f"| {metric} | {values['llama_mem']:.4g} | {values['llama']:.4g} | {ratio:.2f}x |", flush=True)

    print("| metric | LlamaMem | Llama | ratio |\n|---|---|---|---|")
    for length in settings["train"]:
        add(f"train tokens/s @ {length}", {n: train_tokens_per_s(m, length) for n, m in models.items()}, True)
    params = sum(p.numel() for p in models["llama_mem"].parameters())
    train_rate = results["rows"][0]["llama_mem"]
    results["train_mfu"] = 6 * params * train_rate / (results["matmul_peak_gflops"] * 1e9)
    print(
        f"| LlamaMem training MFU @ {settings['train'][0]} (6 N tokens/s / matmul peak) | "
        f"{results['train_mfu']:.1%} | | |"
    )
    for length in sorted(set(settings["prefill"]) | set(settings["decode"])):
        rates, decode, sizes = {}, {}, {}
        for name, model in models.items():
            rates[name], cache = prefill(model, length)
            decode[name] = decode_ms(model, cache)
            sizes[name] = cache_bytes(cache)
            del cache
        if length in settings["prefill"]:
            add(f"prefill tokens/s @ {length}", rates, True)
        if length in settings["decode"]:
            add(f"decode ms/token @ {length}", decode, False)
        add(f"cache MB @ {length}", {n: b / 2**20 for n, b in sizes.items()}, False)
    results["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(
        f"peak RSS of the process (both models): {results['peak_rss_gb']:.2f} GB; "
        f"matmul peak {results['matmul_peak_gflops']:.1f} GFLOP/s"
    )
    with open(args.json, "w") as handle:
        json.dump(results, handle, indent=2)


if __name__ == "__main__":
    main()
