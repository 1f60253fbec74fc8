"""Trained memory deltas that ship inside the package (NAME.safetensors, written by `hf-llama-mem extend`), applied by
name with `hf-llama-mem convert SRC DST --delta NAME` (hf_llama_mem.convert_llama.SHIPPED_DELTAS; see
pyproject.toml's package-data)."""
