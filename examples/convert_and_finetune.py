"""Start from a Llama checkpoint: convert it to LlamaMem, then fine-tune on long documents.

    python examples/convert_and_finetune.py                         # a small random Llama saved locally (CPU)
    python examples/convert_and_finetune.py --checkpoint path/to/llama --window 1024 --block-size 8192

The conversion copies every Llama tensor and adds memory modules with closed gates, so the converted model starts as
the sliding-window Llama (checked here). Fine-tuning then trains LoRA adapters on the original weights and the new
memory parameters fully, with their own, larger learning rate (hf_llama_mem.training explains why). The loss on
held-out documents is reported before and after, with the memory gates opening from zero.
"""

import argparse
import json
import os

from lora_finetune import finetune_with_lora
from small_models import small_config
from transformers import AutoTokenizer, ByT5Tokenizer, LlamaConfig, LlamaForCausalLM
from transformers.trainer_utils import set_seed

from hf_llama_mem import LlamaMemForCausalLM


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", help="Llama checkpoint folder or hub id (default: a small random Llama)")
    parser.add_argument("--output-dir", default="convert_output")
    parser.add_argument("--window", type=int, default=64)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--block-size", type=int, default=512, help="document length, several windows")
    parser.add_argument("--corpus-bytes", type=int, default=500_000)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--learning-rate", type=float, default=2e-3)
    parser.add_argument("--memory-learning-rate", type=float, default=1e-2)
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def small_random_llama(folder: str) -> str:
    """Save a small random LlamaForCausalLM (ByT5 byte vocabulary) to `folder`, standing in for a checkpoint."""
    tokenizer = ByT5Tokenizer()
    LlamaForCausalLM(small_config(tokenizer, LlamaConfig)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def main(argv=None) -> dict:
    args = parse_args(argv)
    set_seed(args.seed)
    checkpoint = args.checkpoint or small_random_llama(os.path.join(args.output_dir, "llama_source"))
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    source = LlamaForCausalLM.from_pretrained(checkpoint)
    model = LlamaMemForCausalLM.from_llama(source, sliding_window=args.window)  # verifies the conversion
    check = model.conversion_check
    del source
    model.train()
    args.train_memory = True
    results = {"conversion_check": check, **finetune_with_lora(model, tokenizer, args)}
    gates = [layer.self_attn.memory.gate.abs().mean().item() for layer in model.model.layers]
    results["memory_gates_after"] = gates  # the merged model: every gate started at exactly zero
    with open(os.path.join(args.output_dir, "convert_finetune_results.json"), "w") as handle:
        json.dump(results, handle, indent=2)
    print(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
