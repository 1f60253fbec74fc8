"""The small model that `hf-llama-mem demo` trains and the examples build when no checkpoint is given, defined once.

(The tests' tiny model, hidden 64, is tests/helpers.py's TINY_DIMS; the benchmark's sizes are bench.py's.)
"""

__all__ = ["SMALL_DIMS"]

# 2 layers, hidden 128: associative recall trains on a CPU in minutes, and the memory still shows (DESIGN.md, 1).
# Each user sets its own vocabulary and key/value heads (the demo full multi-head, the examples grouped-query).
SMALL_DIMS = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4)
