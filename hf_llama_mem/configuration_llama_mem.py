"""LlamaMemConfig: Llama's configuration plus the sliding window and the per-layer memory settings."""

import math

from huggingface_hub.dataclasses import strict
from transformers.models.llama.configuration_llama import LlamaConfig

__all__ = ["LlamaMemConfig"]

MEMORY_RULES = ("gated_delta", "delta")


@strict
class LlamaMemConfig(LlamaConfig):
    r"""
    Configuration of a Llama decoder whose attention reads the last `sliding_window` tokens exactly and everything
    older from a per-layer memory matrix.

    Args (beyond [`LlamaConfig`]):
        sliding_window (`int`): W, the number of most recent tokens (the current one included) that softmax
            attention sees. Token j is written to the memory when it leaves the window, at step j + W.
        memory_rule (`str`): "gated_delta" (learned per-token decay) or "delta" (no decay).
        memory_layers (`list[int] | None`): indices of the layers with a memory reader; None means every layer and
            [] none, which is a plain sliding-window Llama (the baseline every memory claim is measured against).
        memory_chunk_size (`int`): chunk length of the chunkwise-parallel memory op used for training and prefill.
        memory_conv_size (`int`): taps of the causal depthwise convolution on the memory key (the token itself
            included), which lets a token's memory key carry its predecessors.
        memory_gate_init (`float`): starting value of the per-head gate on the memory read in a freshly initialised
            model. 1.0 (open) learns associative recall fastest; for language modelling from scratch, 0.0 with a
            larger learning rate on the memory parameters trained better in our runs (see examples/train_clm.py).

    ```python
    >>> from hf_llama_mem import LlamaMemConfig, LlamaMemForCausalLM
    >>> config = LlamaMemConfig(hidden_size=128, num_hidden_layers=2, num_attention_heads=4, sliding_window=64)
    >>> model = LlamaMemForCausalLM(config)
    ```"""

    model_type = "llama_mem"

    sliding_window: int = 4096
    memory_rule: str = "gated_delta"
    memory_layers: list[int] | None = None
    memory_chunk_size: int = 64
    memory_conv_size: int = 4
    memory_gate_init: float | int = 1.0
    layer_types: list[str] | None = None

    def __post_init__(self, **kwargs):
        # The cache layout follows the memory layers: a memory layer keeps a window plus recurrent states
        # ("hybrid_sliding"), a layer without memory only its window ("sliding_attention").
        if self.layer_types is None and isinstance(self.num_hidden_layers, int):
            self.layer_types = [
                "hybrid_sliding" if self.has_memory(i) else "sliding_attention" for i in range(self.num_hidden_layers)
            ]
        super().__post_init__(**kwargs)
        # Checked here as well as in `validate_architecture`: `@strict` re-raises validator errors as its own
        # exception type, which is not a ValueError, and a bad config must raise ValueError.
        self._check_memory_fields()

    def has_memory(self, layer_idx: int) -> bool:
        return self.memory_layers is None or layer_idx in self.memory_layers

    def validate_architecture(self):
        """Part of `@strict` validation: cross-field checks, each naming the bad value."""
        self._check_memory_fields()

    def _check_memory_fields(self):
        if self.num_attention_heads < 1 or self.hidden_size % self.num_attention_heads != 0:
            raise ValueError(
                f"hidden_size ({self.hidden_size}) must be a multiple of num_attention_heads "
                f"({self.num_attention_heads})."
            )
        if self.num_key_value_heads < 1 or self.num_attention_heads % self.num_key_value_heads != 0:
            raise ValueError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of num_key_value_heads "
                f"({self.num_key_value_heads})."
            )
        for name in ("sliding_window", "memory_chunk_size", "memory_conv_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}.")
        if not isinstance(self.memory_gate_init, (int, float)) or not math.isfinite(self.memory_gate_init):
            raise ValueError(f"memory_gate_init must be a finite number, got {self.memory_gate_init!r}.")
        if self.memory_rule not in MEMORY_RULES:
            raise ValueError(f"memory_rule must be one of {MEMORY_RULES}, got {self.memory_rule!r}.")
        for layer_idx in self.memory_layers or []:
            if not 0 <= layer_idx < self.num_hidden_layers:
                raise ValueError(
                    f"memory_layers contains {layer_idx}, but layer indices run from 0 to "
                    f"{self.num_hidden_layers - 1}."
                )
        expected = [
            "hybrid_sliding" if self.has_memory(i) else "sliding_attention" for i in range(self.num_hidden_layers)
        ]
        if self.layer_types != expected:
            raise ValueError(
                f"layer_types {self.layer_types} does not match memory_layers {self.memory_layers}; "
                f"expected {expected}."
            )
