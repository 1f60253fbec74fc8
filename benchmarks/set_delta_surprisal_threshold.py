"""Record a surprisal threshold in a delta file, its tensors unchanged: the model `convert --delta` builds from it
then writes only what the windowed model found surprising (LlamaMemConfig.memory_write_surprisal_threshold).

    python benchmarks/set_delta_surprisal_threshold.py DELTA T [--output OUT]

DELTA: a delta file or a shipped delta's name (then the shipped file is rewritten). T: nats, or 'none' to remove it.
The metadata keeps the delta's training record as it was, and adds `amended`, a list of what was changed afterwards
and by which command, so the delta still says how every part of it was made.
"""

import argparse
import json
import sys
from pathlib import Path

from safetensors import safe_open
from safetensors.torch import load_file

from hf_llama_mem.convert_llama import resolve_delta
from hf_llama_mem.extend import read_delta_metadata, save_delta_file


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("delta", help="a delta file or a shipped delta's name")
    parser.add_argument("threshold", help="nats, or 'none'")
    parser.add_argument("--output", help="where to write (default: over DELTA)")
    args = parser.parse_args()
    path = resolve_delta(args.delta)
    threshold = None if args.threshold == "none" else float(args.threshold)
    read_delta_metadata(path)  # refuses a file that is not a delta
    with safe_open(str(path), framework="pt") as handle:
        raw = dict(handle.metadata())
    amended = json.loads(raw.get("amended", "[]"))
    amended.append(
        {
            "memory_write_surprisal_threshold": threshold,
            "command": "python benchmarks/set_delta_surprisal_threshold.py " + " ".join(sys.argv[1:]),
        }
    )
    raw["memory_write_surprisal_threshold"] = json.dumps(threshold)
    raw["amended"] = json.dumps(amended)
    out = Path(args.output) if args.output else path
    save_delta_file(out, load_file(str(path)), raw)
    print(f"{out}: memory_write_surprisal_threshold = {threshold}")


if __name__ == "__main__":
    main()
