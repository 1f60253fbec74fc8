"""LlamaMem vs transformers' LlamaForCausalLM, same dimensions, one process: the same as `hf-llama-mem bench`.

Usage: python benchmarks/bench_vs_llama.py [--quick] [--json bench_vs_llama.json]
"""

import sys

from hf_llama_mem.cli import main

if __name__ == "__main__":
    main(["bench", *sys.argv[1:]])
