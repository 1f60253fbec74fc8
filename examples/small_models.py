"""The small models the examples build when no checkpoint is given: the package's SMALL_DIMS (2 layers, hidden 128)
with grouped-query attention and the ByT5 byte vocabulary. Shared by the examples (each runs as a script, so this
sibling module is importable)."""

from transformers import ByT5Tokenizer

from hf_llama_mem import LlamaMemConfig
from hf_llama_mem.small_models import SMALL_DIMS


def small_config(tokenizer: ByT5Tokenizer, config_class=LlamaMemConfig, **overrides):
    """A small LlamaMemConfig (or LlamaConfig, for a stand-in Llama checkpoint) for `tokenizer`'s vocabulary."""
    settings = dict(
        vocab_size=len(tokenizer),
        **SMALL_DIMS,
        num_key_value_heads=2,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
    )
    return config_class(**{**settings, **overrides})


__all__ = ["small_config"]
