"""The long-context metrics as `evaluate` modules, loadable offline from their folders:

import evaluate
from hf_llama_mem.metrics import metric_path

perplexity = evaluate.load(metric_path("stream_perplexity"))
accuracy = evaluate.load(metric_path("long_context_accuracy"))
"""

from pathlib import Path

METRICS = ("long_context_accuracy", "stream_perplexity")


def metric_path(name: str) -> str:
    """The folder of the evaluate module `name` (one of METRICS), for `evaluate.load`."""
    if name not in METRICS:
        raise ValueError(f"Unknown metric {name!r}; expected one of {METRICS}.")
    return str(Path(__file__).parent / name)


__all__ = ["METRICS", "metric_path"]
