"""A multi-turn chat that keeps one memory across turns and across runs.

    python examples/chat_with_memory.py                      # a small random model, scripted turns, CPU, seconds
    python examples/chat_with_memory.py --model path/to/llama_mem --memory chat.safetensors --turn "Hi again"

Every turn is one generate() call that continues the same cache (hf_llama_mem.generate_with_memory), so the model
never re-reads the conversation: the last W tokens sit in the window, everything older in the per-layer memory. At the
end the memory is saved to `--memory`; the next run with the same file picks the conversation up where it stopped.

To show that turns far beyond the window are still reachable, the script re-reads the whole conversation with the
first user turn altered and measures how much the last reply's logits move: with memory they move, without memory
(a plain sliding-window model) the first turn is out of reach and nothing moves. It also checks that the turn-by-turn
cache gives the same logits as one forward over the whole conversation.
"""

import argparse
import os

import torch
from small_models import small_config
from transformers import AutoModelForCausalLM, AutoTokenizer, ByT5Tokenizer

from hf_llama_mem import LlamaMemForCausalLM, generate_with_memory, load_memory, save_memory

SCRIPTED_TURNS = [
    "My name is Ada and my locker code is 4-7-1-9.",
    "Let's talk about something else: how do tides work?",
    "And why is the sky blue during the day but red at sunset?",
    "What was my locker code again?",
]


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="a LlamaMem model folder (default: a small random model, window 32)")
    parser.add_argument("--memory", default="chat_memory.safetensors", help="memory file to resume from and save")
    parser.add_argument("--turn", action="append", help="user turns (default: a scripted conversation)")
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--fresh", action="store_true", help="ignore an existing memory file")
    return parser.parse_args(argv)


def load(args) -> tuple[LlamaMemForCausalLM, object]:
    if args.model:
        return AutoModelForCausalLM.from_pretrained(args.model).eval(), AutoTokenizer.from_pretrained(args.model)
    tokenizer = ByT5Tokenizer()
    torch.manual_seed(0)
    return LlamaMemForCausalLM(small_config(tokenizer, sliding_window=32)).eval(), tokenizer


@torch.no_grad()
def reach_of_first_turn(model, conversation: list[torch.Tensor], memory_file: str, probe: torch.Tensor) -> dict:
    """Next-token logits after `probe`, three ways: continuing the saved memory, one forward over the whole
    conversation, and one forward with the first turn's tokens replaced (reversed)."""
    cached = model(input_ids=probe, cache=load_memory(memory_file, model), use_cache=True).logits[:, -1]
    full = torch.cat(conversation + [probe], dim=1)
    altered = torch.cat([torch.flip(conversation[0], dims=[1])] + conversation[1:] + [probe], dim=1)
    logits = model(full).logits[:, -1]
    return {
        "tokens": full.shape[1],
        "window": model.config.sliding_window,
        "cached_vs_one_forward": (logits - cached).abs().max().item(),
        "effect_of_first_turn": (model(altered).logits[:, -1] - logits).abs().max().item(),
    }


def main(argv=None) -> dict:
    args = parse_args(argv)
    model, tokenizer = load(args)
    resumed = os.path.exists(args.memory) and not args.fresh
    cache = load_memory(args.memory, model) if resumed else None
    if resumed:
        print(f"resumed a conversation of {cache.get_seq_length()} tokens from {args.memory}")
    conversation = []  # kept only for the reachability check; the model itself reads each token once
    for text in args.turn or SCRIPTED_TURNS:
        turn = tokenizer(f"User: {text}\nAssistant:", return_tensors="pt", add_special_tokens=False).input_ids
        reply, cache = generate_with_memory(
            model, turn, cache, max_new_tokens=args.max_new_tokens, min_new_tokens=args.max_new_tokens, do_sample=False
        )
        conversation += [turn, reply]
        print(f"User: {text}\nAssistant: {tokenizer.decode(reply[0], skip_special_tokens=True)!r}")
        print(
            f"  (the memory has read {cache.get_seq_length()} tokens; the window holds the last "
            f"{model.config.sliding_window})"
        )
    save_memory(cache, args.memory, model)
    print(f"memory saved to {args.memory}: run again to continue this conversation")
    report = {}
    if not resumed:
        probe = tokenizer("User:", return_tensors="pt", add_special_tokens=False).input_ids
        report = reach_of_first_turn(model, conversation, args.memory, probe)
        print(
            f"conversation of {report['tokens']} tokens, window {report['window']}: changing the first turn moves the "
            f"next logits by {report['effect_of_first_turn']:.3e} (0 would mean it is out of reach); the saved "
            f"memory and one forward over the whole conversation differ by {report['cached_vs_one_forward']:.1e}"
        )
    return report


if __name__ == "__main__":
    main()
