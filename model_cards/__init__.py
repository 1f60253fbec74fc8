"""The model card templates, shipped inside the package as hf_llama_mem.model_cards (see pyproject.toml)."""
