"""Passkeys by length and depth, and perplexity by position past W, of an `extend` checkpoint or delta (SmolLM2).

    python benchmarks/eval_extend_checkpoint.py RUN/checkpoints/step-000150 [--lengths 1024,2048,4096]
        [--depths 0,0.25,0.5,0.75] [--samples 1] [--text FILE] [--tokens 4096] [--windowed] [--write-bias-shift X]
        [--recentre]

One JSON line: perplexity of the held-out text's first --tokens tokens below W, from W to 1K and from 1K on (by
default the Python 2.6 "what's new", Debian's python3.11-doc: never trained on); then for each length the passkey
evaluation's answer loss per token and exact match per depth (seed 1, --samples per depth). --windowed closes every
memory gate first: the windowed model the checkpoint was converted from, on the same samples. --write-bias-shift adds
X to every memory write bias first (what `extend --write-bias-shift` starts a stage from, here without training).
--recentre sets the memory's key and query offsets again as `extend` first set them (minus the means, on 2K tokens of
training text, the memory gates closed for that forward as they were then), with the trained corrections in place:
training lets the keys drift back toward a shared direction, and this measures what centring them again does.
"""

import argparse
import json
import math
import time
from pathlib import Path

import torch
from probe_memory_interference import close_memory_gates, load
from tqdm.auto import tqdm

from hf_llama_mem.convert_llama import load_source_tokenizer
from hf_llama_mem.evals.passkey import PasskeyOptions, PasskeyTask
from hf_llama_mem.evals.perplexity import PerplexityByPosition
from hf_llama_mem.extend import CENTERING_TOKENS, calibrate_centering, shift_write_bias
from hf_llama_mem.long_context_data import LongContextData, NaturalText

HELD_OUT = "/usr/share/doc/python3.11/html/_sources/whatsnew/2.6.rst.txt"


def perplexity_by_position(model, ids: torch.LongTensor) -> dict:
    """The perplexity evaluation's per-token losses (read through the cache), in three bands of position."""
    nll = PerplexityByPosition(max_tokens=ids.shape[1]).stream_losses(model, ids, tqdm(disable=True))  # token i + 1
    window = model.config.sliding_window
    bands = {"below W": (0, window - 1), "W to 1K": (window - 1, 1023), "1K on": (1023, len(nll))}
    return {name: round(math.exp(nll[lo:hi].mean().item()), 2) for name, (lo, hi) in bands.items() if hi > lo}


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", help="an extend checkpoint folder, or a delta file or name")
    parser.add_argument("--lengths", default="1024,2048,4096")
    parser.add_argument("--depths", default="0,0.25,0.5,0.75")
    parser.add_argument("--samples", type=int, default=1, help="samples per length and depth")
    parser.add_argument("--text", default=HELD_OUT)
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--windowed", action="store_true", help="close the memory gates first")
    parser.add_argument("--write-bias-shift", type=float, default=0.0, help="added to every memory write bias")
    parser.add_argument("--recentre", action="store_true", help="set the key and query offsets again")
    args = parser.parse_args()
    model, tokenizer = load(args.model), load_source_tokenizer("smollm2")
    if args.windowed:
        close_memory_gates(model)
    shift_write_bias(model, args.write_bias_shift)
    if args.recentre:
        data = LongContextData(tokenizer, NaturalText.for_split(tokenizer, "train"))
        text = data.generate("language_modelling", CENTERING_TOKENS + model.config.sliding_window, 0)
        opened = close_memory_gates(model)
        calibrate_centering(model, torch.tensor([text["input_ids"]]))
        for name, param in model.named_parameters():
            if name in opened:
                param.copy_(opened[name])
    start = time.time()
    ids = tokenizer(Path(args.text).read_text(), return_tensors="pt").input_ids[:, : args.tokens]
    result = {"model": args.model, "windowed": args.windowed, "write_bias_shift": args.write_bias_shift}
    result["recentred"] = args.recentre
    result["perplexity"] = perplexity_by_position(model, ids)
    depths = tuple(float(d) for d in args.depths.split(","))
    for length in (int(x) for x in args.lengths.split(",")):
        task = PasskeyTask(PasskeyOptions(lengths=(length,), depths=depths, samples=args.samples))
        result[f"passkey {length}"] = {
            "answer_loss": round(task.answer_loss(model, tokenizer, seed=1), 3),
            "exact_by_depth": task.evaluate(model, tokenizer, seed=1, progress=False)["grid"][0],
        }
    result["seconds"] = round(time.time() - start)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
