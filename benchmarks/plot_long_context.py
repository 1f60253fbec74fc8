"""Draw the README's long-context figures from `hf-llama-mem eval` result files (JSON), one line per model.

    python benchmarks/plot_long_context.py perplexity docs/perplexity_smollm2.png "source (full attention)=a.json" \
        "converted W=256=b.json" ...
    python benchmarks/plot_long_context.py passkey docs/passkey_smollm2.png "extended=c.json" ...

Perplexity is drawn by position bucket (its end); passkey as accuracy by context length (mean over depths).
"""

import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def lines(kind: str, results: dict) -> tuple[list[int], list[float]]:
    if kind == "perplexity":
        points = [(end, ppl) for (_, end), ppl in zip(results["buckets"], results["perplexity"], strict=True) if ppl]
    elif kind == "passkey":
        points = [(int(length), accuracy) for length, accuracy in results["by_length"].items()]
    else:
        raise SystemExit(f"kind must be perplexity or passkey, got {kind!r}")
    points.sort()
    return [p[0] for p in points], [p[1] for p in points]


def main(kind: str, output: str, *named_files: str) -> None:
    figure, axis = plt.subplots(figsize=(7, 4))
    for entry in named_files:
        label, path = entry.rsplit("=", 1)
        with open(path) as handle:
            x, y = lines(kind, json.load(handle))
        axis.plot(x, y, marker="o", label=label)
    axis.set_xscale("log", base=2)
    if kind == "perplexity":
        axis.set_yscale("log")  # a source past its trained context reaches thousands
    axis.set_xlabel("position in the document (bucket end, tokens)" if kind == "perplexity" else "context length")
    axis.set_ylabel("perplexity" if kind == "perplexity" else "passkey accuracy (mean over depths)")
    axis.axvline(8192, color="gray", linestyle=":", label="source's trained context (8192)")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(output, dpi=110)


if __name__ == "__main__":
    main(*sys.argv[1:])
