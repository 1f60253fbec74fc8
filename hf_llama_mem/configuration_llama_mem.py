"""LlamaMemConfig: Llama's configuration plus the sliding window and the per-layer memory settings."""

import math

from huggingface_hub.dataclasses import strict
from huggingface_hub.errors import StrictDataclassClassValidationError, StrictDataclassFieldValidationError
from transformers.models.llama.configuration_llama import LlamaConfig

__all__ = ["ConfigClassValueError", "ConfigTypeError", "ConfigValueError", "LlamaMemConfig"]

MEMORY_RULES = ("gated_delta", "delta")

# The chunked memory op pads every sequence to whole chunks and builds C x C matrices and a triangular solve per chunk
# and head: its cost grows with C^2 per token while the point of chunking is small C (64 here, as in
# flash-linear-attention). 1024 keeps one chunk's matrices at 4 MB per head in float32, a few times more than any
# setting we measured as useful; 10**9 would ask for gigabytes on the first forward.
MAX_MEMORY_CHUNK_SIZE = 1024

# Sizes that must be positive integers (head_dim may still be None before LlamaConfig derives it).
POSITIVE_SIZES = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "max_position_embeddings",
    "sliding_window",
    "memory_chunk_size",
    "memory_conv_size",
)


class ConfigTypeError(StrictDataclassFieldValidationError, TypeError):
    """A field of the wrong type: a TypeError, and still huggingface_hub's strict-dataclass error."""


class ConfigValueError(StrictDataclassFieldValidationError, ValueError):
    """A field validator's refusal (initializer_range outside [0, 1]): a ValueError, and still huggingface_hub's."""


class ConfigClassValueError(StrictDataclassClassValidationError, ValueError):
    """`config.validate()` refusing a combination of fields: a ValueError, and still huggingface_hub's."""


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
        memory_chunk_size (`int`): chunk length of the chunkwise-parallel memory op used for training and prefill,
            1 to 1024 (`MAX_MEMORY_CHUNK_SIZE`).
        memory_conv_size (`int`): taps of the causal depthwise convolution on the memory key (the token itself
            included), which lets a token's memory key carry its predecessors.
        memory_projection_rank (`int`): rank of the memory's own low-rank corrections to the query it reads with and
            the key it writes with (0: none, the memory uses the attention's pre-RoPE q and k as they are). They
            start at zero, so a conversion stays exact; they let the memory learn keys for retrieval without changing
            what softmax attention computes.
        memory_centering (`bool`): learned offsets added to the memory's key (before its L2 normalisation) and to
            its query, one per head and channel, starting at zero; `hf_llama_mem.extend.calibrate_centering` sets
            them to minus their means on sample text. A pretrained model's keys share a large common direction
            (on SmolLM2 the mean of unit memory keys has norm 0.6-0.99), so every write would overlap and erase every
            earlier one; centred keys keep a stored fact apart from later writes.
        memory_token_gate (`bool`): a per-token term of the read's gate, a linear function of the token's hidden
            state (one weight row per head), added to the per-head gate and starting at zero. With a per-head gate
            alone every token gets the memory's read at the same strength, needed or not: on a pretrained model,
            trained on retrieval, that costs the perplexity of ordinary text past W.
        memory_write_surprisal_threshold (`float | None`): None (default): every token writes when it leaves the
            window, with its learned write strength. A number T >= 0 (nats): a token writes only if the windowed model
            (the same weights, every memory off) found it surprising, -log p(token | everything before it) > T;
            every other token's write strength is zero. It is causal (the surprisal is known when the token is read,
            W steps before it writes), needs the LM head (`LlamaMemForCausalLM`) and input_ids, costs a second
            decoder pass without memory, and runs a forward in pieces of W - 1 tokens through a cache, so that every
            token's surprisal is known before it writes. Why: on SmolLM2 a learned write
            projection could not tell an unseen format's facts from its filler, while surprisal could (README,
            "Long context from a pretrained Llama"); the first token of a sequence has no prediction and writes
            nothing.
        memory_gate_init (`float`): starting value of the per-head gate on the memory read in a freshly initialised
            model. 1.0 (open) learns associative recall fastest; for language modelling from scratch, 0.0 with a
            larger learning rate on the memory parameters trained better in our runs (see examples/train_clm.py).

    Errors: a bad value or combination raises ValueError naming it, at construction, in `validate()` (run by
    `save_pretrained`) and when a model is built from the config (`validate_memory_settings`), so a field changed
    after construction is refused before any use. A value of the wrong type raises `ConfigTypeError` on construction
    or assignment: a TypeError that is also huggingface_hub's `StrictDataclassFieldValidationError`.

    ```python
    >>> from hf_llama_mem import LlamaMemConfig, LlamaMemForCausalLM
    >>> config = LlamaMemConfig(hidden_size=128, num_hidden_layers=2, num_attention_heads=4, sliding_window=64)
    >>> model = LlamaMemForCausalLM(config)
    ```"""

    model_type = "llama_mem"
    # Tensor parallelism (`from_pretrained(..., tp_plan="auto")`): the MLP is sharded as in Llama, the attention is
    # not. A memory layer's memory reads all of the layer's pre-RoPE keys, values and queries (the key convolution
    # and the decay and write projections are per kv head over the whole hidden state), so sharding q/k/v would hand
    # it a slice of the heads; a plan names layers only by wildcard, so every layer's attention stays whole on each
    # rank (replicated). The model adds the embedding (sharded on the vocabulary) and LlamaMemForCausalLM the LM
    # head (sharded the same way, so tied weights are sharded together).
    base_model_tp_plan = {
        "layers.*.mlp.gate_proj": "colwise",
        "layers.*.mlp.up_proj": "colwise",
        "layers.*.mlp.down_proj": "rowwise",
    }
    # Pipeline parallelism is not supported: Llama's plan passes (hidden_states, attention_mask) between stages, and
    # a LlamaMem layer takes the window view and the cache instead. None makes transformers refuse it.
    base_model_pp_plan = None

    sliding_window: int = 4096
    memory_rule: str = "gated_delta"
    memory_layers: list[int] | None = None
    memory_chunk_size: int = 64
    memory_conv_size: int = 4
    memory_gate_init: float | int = 1.0
    memory_projection_rank: int = 0
    memory_centering: bool = False
    memory_token_gate: bool = False
    memory_write_surprisal_threshold: float | int | None = None
    layer_types: list[str] | None = None

    def __post_init__(self, **kwargs):
        # LlamaConfig divides hidden_size by num_attention_heads to derive head_dim: check the sizes first.
        self._check_sizes()
        # The cache layout follows the memory layers: a memory layer keeps a window plus recurrent states
        # ("hybrid_sliding"), a layer without memory only its window ("sliding_attention").
        if self.layer_types is None and isinstance(self.num_hidden_layers, int):
            self.layer_types = self.expected_layer_types()
        super().__post_init__(**kwargs)
        # Checked here as well as by `validate()`: `@strict` re-raises validator errors as its own exception type,
        # and a bad config must raise ValueError.
        self.validate_memory_settings()

    def has_memory(self, layer_idx: int) -> bool:
        return self.memory_layers is None or layer_idx in self.memory_layers

    def expected_layer_types(self) -> list[str]:
        return ["hybrid_sliding" if self.has_memory(i) else "sliding_attention" for i in range(self.num_hidden_layers)]

    def validate_architecture(self):
        """Replaces LlamaConfig's check (which divides by num_attention_heads before checking it)."""
        self.validate_memory_settings()

    def validate_memory_settings(self):
        """Every check of the sizes and memory settings, each raising a ValueError that names the bad value.

        Runs at construction, in `validate()` (so at `save_pretrained`), and when a model is built from the config:
        `@strict` checks only the type of a field assigned after construction, so a model built from a config
        changed that way (`config.sliding_window = 0`) refuses it here rather than running with it.
        """
        self._check_sizes()
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even (RoPE rotates pairs of dimensions), got {self.head_dim}.")
        if self.hidden_size % self.num_attention_heads != 0:
            raise ValueError(
                f"hidden_size ({self.hidden_size}) must be a multiple of num_attention_heads "
                f"({self.num_attention_heads})."
            )
        if self.num_attention_heads % self.num_key_value_heads != 0:
            raise ValueError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of num_key_value_heads "
                f"({self.num_key_value_heads})."
            )
        if self.memory_chunk_size > MAX_MEMORY_CHUNK_SIZE:
            raise ValueError(
                f"memory_chunk_size must be at most {MAX_MEMORY_CHUNK_SIZE}, got {self.memory_chunk_size}: every "
                f"sequence is padded to whole chunks and each chunk costs C x C per head (64 is the default)."
            )
        if self.memory_projection_rank < 0:
            raise ValueError(f"memory_projection_rank must be >= 0, got {self.memory_projection_rank}.")
        gate = self.memory_gate_init
        if isinstance(gate, bool) or not isinstance(gate, (int, float)) or not math.isfinite(gate):
            raise ValueError(f"memory_gate_init must be a finite number, got {gate!r}.")
        threshold = self.memory_write_surprisal_threshold
        if threshold is not None:
            if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not threshold >= 0:
                raise ValueError(
                    f"memory_write_surprisal_threshold must be None or a number of nats >= 0, got {threshold!r}."
                )
            if not math.isfinite(threshold):
                raise ValueError(f"memory_write_surprisal_threshold must be finite, got {threshold!r}.")
            if self.sliding_window < 2:
                raise ValueError(
                    f"memory_write_surprisal_threshold needs sliding_window >= 2 (a token's surprisal is known one "
                    f"step after it is read), got sliding_window={self.sliding_window}."
                )
        if self.memory_rule not in MEMORY_RULES:
            raise ValueError(f"memory_rule must be one of {MEMORY_RULES}, got {self.memory_rule!r}.")
        if self.memory_layers is not None:
            for layer_idx in self.memory_layers:
                if isinstance(layer_idx, bool) or not isinstance(layer_idx, int):
                    raise ValueError(f"memory_layers must hold layer indices (int), got {layer_idx!r}.")
                if not 0 <= layer_idx < self.num_hidden_layers:
                    raise ValueError(
                        f"memory_layers contains {layer_idx}, but layer indices run from 0 to "
                        f"{self.num_hidden_layers - 1}."
                    )
                if self.memory_layers.count(layer_idx) > 1:
                    raise ValueError(f"memory_layers lists layer {layer_idx} more than once: {self.memory_layers}.")
        expected = self.expected_layer_types()
        if self.layer_types is None or len(self.layer_types) != self.num_hidden_layers:
            raise ValueError(
                f"num_hidden_layers ({self.num_hidden_layers}) does not match layer_types {self.layer_types}: after "
                f"changing num_hidden_layers or memory_layers, set layer_types too (here {expected}), or build a new "
                f"LlamaMemConfig, which derives it."
            )
        if self.layer_types != expected:
            raise ValueError(
                f"layer_types {self.layer_types} does not match memory_layers {self.memory_layers}; "
                f"expected {expected}."
            )

    def _check_sizes(self):
        for name in POSITIVE_SIZES:
            value = getattr(self, name)
            if value is None and name in ("head_dim", "num_key_value_heads"):
                continue  # derived by LlamaConfig.__post_init__
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"{name} must be an int >= 1, got {value!r}.")
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}.")


# `@strict` raises its own exception types, which are neither ValueError nor TypeError. Re-raise them as errors that
# are both: what users of a transformers config expect, and still what code catching huggingface_hub's catches.
_strict_setattr = LlamaMemConfig.__setattr__


def _setattr(self, name, value):
    try:
        _strict_setattr(self, name, value)
    except StrictDataclassFieldValidationError as error:
        if isinstance(error, (TypeError, ValueError)):
            raise
        cause = error.__cause__
        kind = ConfigTypeError if isinstance(cause, TypeError) else ConfigValueError
        raise kind(field=name, cause=cause) from cause


def _validate(self):
    """Run the class validators (`validate_*`) as `@strict`'s `validate()` does, raising ConfigClassValueError."""
    for validator in type(self).__class_validators__:
        try:
            validator(self)
        except (ValueError, TypeError) as error:
            raise ConfigClassValueError(validator=validator.__name__, cause=error) from error


_validate.__is_defined_by_strict_decorator__ = True  # lets a @strict subclass replace it, as it would strict's own
LlamaMemConfig.__setattr__ = _setattr
LlamaMemConfig.validate = _validate
