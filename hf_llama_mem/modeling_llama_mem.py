"""LlamaMem: a Llama decoder whose attention reads the last W tokens exactly and everything older from a memory.

Each memory layer's attention has two readers over the same q, k, v: causal softmax attention over the last
`sliding_window` tokens (RoPE, GQA, through the attention interface the config selects), and a per-kv-head gated
delta-rule matrix S that holds exactly the tokens that have left the window (see memory_ops.py for the op and
its derivation). The cache is a transformers `DynamicCache` (with or without a config): each layer keeps its window's
keys and attention values as any sliding-window layer does, and a memory layer ("hybrid_sliding", a
`LlamaMemCacheLayer`) also the window tokens' memory entries, S and the key-convolution state; generate() works
unchanged, beam search and `batch_repeat_interleave` included. Every forward checks the cache's layers against the
config (`prepare_cache`): a cache built for another configuration is refused by name, and a StaticCache gets the
fixed-shape layers of a compiled decode step (fixed_cache.py). A cache filled
by a model of the same configuration with other weights cannot be told apart that cheaply and is not refused (memory
files carry a weight fingerprint: `load_memory` refuses those).
"""

import math
from typing import NamedTuple

import torch
from torch import nn
from transformers import initialization as init
from transformers.cache_utils import Cache, DynamicCache
from transformers.generation import GenerationMixin, MaxLengthCriteria
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, PreTrainedModel
from transformers.models.llama.modeling_llama import (
    LlamaMLP,
    LlamaRMSNorm,
    LlamaRotaryEmbedding,
    apply_rotary_pos_emb,
    eager_attention_forward,
)
from transformers.utils import logging

from .causal_lm_loss import causal_lm_loss
from .configuration_llama_mem import LlamaMemConfig
from .fixed_cache import FixedWindowLayer
from .memory_layer import LlamaMemMemory, LowRankCorrection
from .surprisal_writes import surprisal_gated_forward
from .windowed_attention import (
    WindowView,
    check_not_packed,
    check_padding_is_exact,
    fixed_slots,
    keep_owned_window,
    make_window_view,
    positions_from_mask,
    prepare_cache,
    windowed_attention,
)

__all__ = ["LlamaMemForCausalLM", "LlamaMemModel", "LlamaMemPreTrainedModel"]

logger = logging.get_logger(__name__)

# transformers 5.24 renamed the cache field of model outputs (and the forward keyword) from `past_key_values` to
# `cache`; generate() reads whichever name the installed version uses.
CACHE_FIELD = "cache" if "cache" in BaseModelOutputWithPast.__dataclass_fields__ else "past_key_values"
# Without gradients, a longer input runs through the cache in pieces of this many tokens (see LlamaMemModel.forward).
PREFILL_SEGMENT = 2048
# The per-token decay exp(-softplus(bias)) starts with its step softplus(bias) drawn log-uniformly from this range,
# a decay between 0.90 and 0.999 (the dt initialisation of Mamba and GDN).
DECAY_STEP_INIT_RANGE = (1e-3, 1e-1)


class LlamaMemAttention(nn.Module):
    """Llama attention over the last W tokens, plus the memory reader on memory layers.

    Adapted from transformers.models.llama.modeling_llama.LlamaAttention: same projections and names, so a Llama
    checkpoint loads by a plain copy.
    """

    def __init__(self, config: LlamaMemConfig, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.head_dim = config.head_dim
        self.num_key_value_groups = config.num_attention_heads // config.num_key_value_heads
        self.scaling = self.head_dim**-0.5
        self.attention_dropout = config.attention_dropout
        self.is_causal = True
        hidden, heads, kv_heads = config.hidden_size, config.num_attention_heads, config.num_key_value_heads
        self.q_proj = nn.Linear(hidden, heads * self.head_dim, bias=config.attention_bias)
        self.k_proj = nn.Linear(hidden, kv_heads * self.head_dim, bias=config.attention_bias)
        self.v_proj = nn.Linear(hidden, kv_heads * self.head_dim, bias=config.attention_bias)
        self.o_proj = nn.Linear(heads * self.head_dim, hidden, bias=config.attention_bias)
        self.memory = LlamaMemMemory(config, layer_idx) if config.has_memory(layer_idx) else None

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        view: WindowView,
        cache: Cache | None = None,
    ) -> torch.Tensor:
        batch, length, _ = hidden_states.shape
        hidden_shape = (batch, length, -1, self.head_dim)
        query = self.q_proj(hidden_states).view(hidden_shape).transpose(1, 2)  # [B, H, T, D]
        key = self.k_proj(hidden_states).view(hidden_shape).transpose(1, 2)  # [B, Hkv, T, D]
        value = self.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        layer_cache = cache.layers[self.layer_idx] if cache is not None else None
        memory = self.memory if view.reads_memory else None
        memory_cache = layer_cache if memory is not None else None

        if memory is not None:
            # What each token writes when it leaves the window, [value | memory key | g | beta] in float32; without a
            # cache the memory reads these, with one the cache window's.
            writes = self.memory("write", hidden_states, key, value, view, memory_cache)
            memory_values, memory_entries = writes[..., : self.head_dim], writes[..., self.head_dim :]
        cos, sin = position_embeddings
        rotated_query, rotated_key = apply_rotary_pos_emb(query, key, cos, sin)
        attention_values = value
        if layer_cache is not None:
            # The window keeps keys and attention values where transformers' code expects them, and a memory layer
            # its tokens' memory entries beside them (LlamaMemCacheLayer), until they leave.
            rotated_key, attention_values = layer_cache.update(rotated_key, value, token_valid=view.token_valid)
            if memory_cache is not None:
                memory_values = attention_values
                memory_entries = memory_cache.update_memory_entries(memory_entries)
            keep_owned_window(layer_cache, view.window)

        interface = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, eager_attention_forward)
        output = windowed_attention(
            self,
            interface,
            rotated_query,
            rotated_key,
            attention_values,
            view,
            dropout=self.attention_dropout if self.training else 0.0,
            scaling=self.scaling,
        )
        if memory is not None:
            read = self.memory("read", hidden_states, query, memory_values, memory_entries, view, memory_cache)
            output = output + read.to(output.dtype)
        return self.o_proj(output.reshape(batch, length, -1))


class LlamaMemDecoderLayer(GradientCheckpointingLayer):
    """Pre-norm decoder block, as in Llama: attention (with memory) and a SwiGLU MLP."""

    def __init__(self, config: LlamaMemConfig, layer_idx: int):
        super().__init__()
        self.self_attn = LlamaMemAttention(config, layer_idx)
        self.mlp = LlamaMLP(config)
        self.input_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        view: WindowView,
        cache: Cache | None = None,
    ) -> torch.Tensor:
        attended = self.self_attn(self.input_layernorm(hidden_states), position_embeddings, view, cache)
        hidden_states = hidden_states + attended
        return hidden_states + self.mlp(self.post_attention_layernorm(hidden_states))


class LlamaMemPreTrainedModel(PreTrainedModel):
    config_class = LlamaMemConfig
    config: LlamaMemConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["LlamaMemDecoderLayer"]
    _supports_sdpa = True
    _supports_attention_backend = False
    _supports_flash_attn = False
    _supports_flex_attn = False
    # The memory is a recurrent state: generate() must not try to roll it back (assisted decoding).
    _is_stateful = True

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        # transformers' init functions skip tensors already loaded from a checkpoint.
        if isinstance(module, nn.Conv1d):
            # PyTorch's default start for the key convolution (as DeltaNet): a near-identity start learns slower.
            init.kaiming_uniform_(module.weight, a=math.sqrt(5))
        else:
            super()._init_weights(module)
        if isinstance(module, LowRankCorrection):
            # As LoRA: a random down projection and a zero up projection, so the correction starts at exactly zero.
            init.kaiming_uniform_(module.down, a=math.sqrt(5))
            init.zeros_(module.up)
        if isinstance(module, LlamaMemMemory):
            # A fresh model starts with the gate at config.memory_gate_init (1.0, open: on associative recall a closed
            # gate learns far more slowly, DESIGN.md section 1). Conversion from Llama closes it (`from_llama`),
            # which keeps the retrofit exact.
            init.constant_(module.gate, self.config.memory_gate_init)
            # Zero at the start (a conversion stays exact), also where from_pretrained builds the model empty.
            for extra in (module.key_offset, module.query_offset, module.token_gate):
                if extra is not None:
                    init.zeros_(extra)
            if module.gated:
                low, high = DECAY_STEP_INIT_RANGE
                step = torch.empty_like(module.decay_bias).uniform_(math.log(low), math.log(high)).exp()
                init.copy_(module.decay_bias, step + torch.log(-torch.expm1(-step)))
                init.zeros_(module.decay_log_rate)

    def save_pretrained(self, save_directory, *args, **kwargs):
        """Save as transformers does, with `auto_map` naming all three Auto classes, so that the folder loads with
        `trust_remote_code=True` where hf_llama_mem is not installed (transformers writes only the saved class).
        `import hf_llama_mem` adds a model card (hub.py)."""
        self.config.auto_map = {
            "AutoConfig": "configuration_llama_mem.LlamaMemConfig",
            "AutoModel": "modeling_llama_mem.LlamaMemModel",
            "AutoModelForCausalLM": "modeling_llama_mem.LlamaMemForCausalLM",
        }
        super().save_pretrained(save_directory, *args, **kwargs)

    def memory_parameters(self) -> list[nn.Parameter]:
        """The parameters of the memory readers (gates, decay and write projections, key convolution, read norm)."""
        return [p for name, p in self.named_parameters() if ".memory." in name]


class LlamaMemModel(LlamaMemPreTrainedModel):
    def __init__(self, config: LlamaMemConfig):
        config.validate_memory_settings()  # a config changed after construction is refused before any use
        super().__init__(config)
        self.padding_idx = config.pad_token_id
        self.vocab_size = config.vocab_size
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList(LlamaMemDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = LlamaRotaryEmbedding(config=config)
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embed_tokens = value

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        past_key_values: Cache | None = None,
        output_attentions: bool | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPast | tuple:
        """The decoder over `input_ids` (or `inputs_embeds`) [B, T], after the `cache`'s tokens if one is given.

        attention_mask [B, past + T] (1 = real token, 0 = padding): left padding is exact (each row computes what it
        computes unpadded), as are pads after a row's last real token, for the tokens before them. Padding between
        real tokens is refused with a ValueError on CPU masks (on an accelerator the mask is not read back, and such
        a row would see fewer than `sliding_window` real tokens): pad on the left, and generate() from left-padded
        prompts (generate() extends the mask with ones on the right, which is not padding). Packed sequences
        (position_ids restarting inside a row, or varlen arguments such as cu_seq_lens_q) are refused
        (`check_not_packed`).
        """
        check_no_attention_weights(output_attentions, self.config)
        # surprisal_writes.py's two passes: the windowed model's (no memory), then the gated one.
        reads_memory = not kwargs.pop("windowed_pass", False)
        if self.config.memory_write_surprisal_threshold is not None and not kwargs.pop("surprisal_gated", False):
            raise ValueError(
                "memory_write_surprisal_threshold gates the writes by the windowed model's predictions, through the "
                "LM head: run LlamaMemForCausalLM, or set the threshold to None to run the decoder alone."
            )
        cache = resolve_cache_argument(cache, past_key_values)
        inputs_embeds = self.embed(input_ids, inputs_embeds)
        batch, length = inputs_embeds.shape[:2]
        differentiable = torch.is_grad_enabled() and (
            inputs_embeds.requires_grad or any(p.requires_grad for p in self.parameters())
        )
        use_cache = use_cache if use_cache is not None else (self.config.use_cache and not self.training)
        if self.gradient_checkpointing and self.training and differentiable and (use_cache or cache):
            logger.warning_once("Gradient checkpointing replays layers, which would write the memory twice: no cache.")
            use_cache, cache = False, None
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        # a foreign cache is refused, DynamicCache() completed
        cache = prepare_cache(cache, self.config if reads_memory else windowed_layout(self.config))
        check_cache_batch(cache, batch)

        past = tokens_read(cache)
        check_attention_mask(attention_mask, batch, past, length)
        check_not_packed(position_ids, attention_mask, past, kwargs)
        output_hidden_states = (
            output_hidden_states if output_hidden_states is not None else self.config.output_hidden_states
        )
        # A long prefill runs segment by segment through the cache (exactly equal, as any prefill split is): peak
        # memory stays that of one segment, and the working set stays small enough to be fast.
        segment = PREFILL_SEGMENT if cache is not None and not differentiable else max(length, 1)
        # The one decode/prefill decision of this forward; WindowView lists the paths it selects.
        modes = dict(
            decoding=cache is not None and length == 1, differentiable=differentiable, reads_memory=reads_memory
        )
        pieces = []
        for start in range(0, max(length, 1), segment):
            end = min(start + segment, length)
            pieces.append(
                self.run_layers(
                    inputs_embeds[:, start:end],
                    None if attention_mask is None else attention_mask[:, : attention_mask.shape[1] - length + end],
                    None if position_ids is None else position_ids[:, start:end],
                    cache,
                    past + start,
                    output_hidden_states,
                    modes,
                )
            )
        if len(pieces) == 1:
            all_hidden_states = pieces[0]
        else:
            all_hidden_states = tuple(torch.cat(states, dim=1) for states in zip(*pieces, strict=True))
        hidden_states = all_hidden_states[-1]

        output = BaseModelOutputWithPast(
            last_hidden_state=hidden_states,
            hidden_states=all_hidden_states if output_hidden_states else None,
            **{CACHE_FIELD: cache},
        )
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        return output if return_dict else output.to_tuple()

    def run_layers(self, inputs_embeds, attention_mask, position_ids, cache, past, output_hidden_states, modes):
        """Every layer over one piece of the input, `past` tokens after the start; returns the final normed hidden
        states, after each layer's input when output_hidden_states. `modes`: WindowView's decoding and
        differentiable."""
        length = inputs_embeds.shape[1]
        slots = fixed_slots(cache)
        view = make_window_view(
            self.config.sliding_window, past, attention_mask, inputs_embeds.device, slots=slots, length=length, **modes
        )
        if position_ids is None:
            position_ids = positions_from_mask(attention_mask, past, length, inputs_embeds.device)
        position_embeddings = self.rotary_emb(inputs_embeds, position_ids=position_ids)
        all_hidden_states = []
        hidden_states = inputs_embeds
        for layer in self.layers:
            if output_hidden_states:
                all_hidden_states.append(hidden_states)
            hidden_states = layer(hidden_states, position_embeddings, view, cache)
        return (*all_hidden_states, self.norm(hidden_states))

    def embed(self, input_ids: torch.LongTensor | None, inputs_embeds: torch.Tensor | None) -> torch.Tensor:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Pass exactly one of input_ids or inputs_embeds (got both or neither).")
        if inputs_embeds is not None:
            return inputs_embeds
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must have shape [batch, length], got {tuple(input_ids.shape)}.")
        # Ids on the CPU are checked for a clear error (a host reduction, no device to wait for); on an accelerator,
        # as in transformers' Llama, they are not: reading the result back would stall every forward. Nor under
        # torch.compile, where a branch on a tensor's value splits the graph.
        if input_ids.device.type == "cpu" and input_ids.numel() and not torch.compiler.is_compiling():
            low, high = torch.aminmax(input_ids)
            if low < 0 or high >= self.config.vocab_size:
                bad = (low if low < 0 else high).item()
                raise ValueError(f"Token id {bad} is outside [0, vocab_size={self.config.vocab_size}).")
        return self.embed_tokens(input_ids)


class WindowedLayout(NamedTuple):
    """What `prepare_cache` reads of a config. A NamedTuple, which torch.compile traces (a compiled decode step with
    surprisal-gated writes builds one per step)."""

    sliding_window: int
    layer_types: list[str]


def windowed_layout(config: LlamaMemConfig) -> WindowedLayout:
    """The layout of the windowed pass: the window, and no layer with memory."""
    return WindowedLayout(config.sliding_window, ["sliding_attention"] * config.num_hidden_layers)


def resolve_cache_argument(cache: Cache | None, past_key_values: Cache | None) -> Cache | None:
    """transformers < 5.24 passes the cache as `past_key_values`, 5.24+ as `cache`: accept either, not two."""
    if cache is not None and past_key_values is not None and cache is not past_key_values:
        raise ValueError("Pass the cache as `cache` or as `past_key_values`, not two different caches.")
    cache = cache if cache is not None else past_key_values
    if cache is not None and not isinstance(cache, Cache):
        raise ValueError(f"The cache must be a transformers Cache (e.g. DynamicCache(config=...)), got {type(cache)}.")
    return cache


def tokens_read(cache: Cache | None) -> int | torch.Tensor:
    """The tokens the cache has read. Under torch.compile a fixed-shape cache's count stays a tensor (its 0-dim
    counter): as a Python int it would enter the step's graph as a value that changes every step, which recompiles,
    or records a new CUDA graph, every step. In eager mode it is read back (on an accelerator, one sync a forward:
    the fixed-shape cache is for compiled steps)."""
    if cache is None:
        return 0
    first = cache.layers[0] if cache.layers else None
    if isinstance(first, FixedWindowLayer) and torch.compiler.is_compiling():
        return first.seen if first.is_initialized else 0
    return cache.get_seq_length()


def check_cache_batch(cache: Cache | None, batch: int) -> None:
    for layer in cache.layers if cache is not None else []:
        keys = getattr(layer, "keys", None)
        if keys is not None and keys.numel() and keys.shape[0] != batch:
            hint = ""
            if batch % keys.shape[0] == 0:
                hint = (
                    f" To continue {batch // keys.shape[0]} sequences per row (num_beams, num_return_sequences), call "
                    f"cache.batch_repeat_interleave({batch // keys.shape[0]}) first."
                )
            raise ValueError(f"The cache holds a batch of {keys.shape[0]} sequences, but the input has {batch}.{hint}")


def check_no_attention_weights(output_attentions: bool | None, config: LlamaMemConfig) -> None:
    if output_attentions if output_attentions is not None else config.output_attentions:
        raise ValueError(
            "output_attentions=True is not supported: LlamaMem attends over its window in blocks and reads the "
            "older tokens from a memory matrix, so there is no attention-weight matrix per layer to return."
        )


def check_attention_mask(attention_mask, batch: int, past: int | torch.Tensor, length: int) -> None:
    """attention_mask is [B, past + T] (1 = real token, 0 = padding) or None; padding between real tokens is refused
    (`check_padding_is_exact`). With `past` a tensor (a compiled step on a fixed-shape cache, `tokens_read`) the
    width is not known without a host read: only the batch, and at least T columns, are checked."""
    if attention_mask is None:
        return
    known = not torch.is_tensor(past)
    expected = past + length if known else f"past + {length}"
    width_ok = attention_mask.shape[-1] == expected if known else attention_mask.shape[-1] >= length
    if attention_mask.dim() != 2 or attention_mask.shape[0] != batch or not width_ok:
        raise ValueError(
            f"attention_mask must have shape [batch, past + length] = [{batch}, {expected}] "
            f"(past = {past if known else 'the'} cached tokens), got {tuple(attention_mask.shape)}."
        )
    check_padding_is_exact(attention_mask)


class LlamaMemForCausalLM(LlamaMemPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}
    # Llama's: the head's weight sharded on the vocabulary (dim 0, as the embedding's "embedding_rowwise"), logits
    # gathered; the base model's plan is LlamaMemConfig.base_model_tp_plan.
    _tp_plan = {"lm_head": "colwise_gather_output"}

    def __init__(self, config: LlamaMemConfig):
        super().__init__(config)
        self.model = LlamaMemModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        # transformers' causal-LM loss, computed without full-size log-probabilities (causal_lm_loss.py), through
        # PreTrainedModel's own loss_function setter: assigning another replaces it, as for any transformers model.
        self.loss_function = causal_lm_loss
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.embed_tokens = value

    # generate() reads config.max_position_embeddings as the context of a bounded model: it caps a default max_length
    # there (so a longer prompt fails: "Input length of input_ids is ..., but `max_length` is set to ...") and warns
    # once a generation passes it. LlamaMem reads any length (the window, then the memory), as transformers' models
    # without positions do: the default is 20 new tokens whatever the prompt's length, and there is no warning.
    def _prepare_generated_length(
        self,
        generation_config,
        has_default_max_length,
        has_default_min_length,
        model_input_name,
        input_ids_length,
        inputs_tensor,
    ):
        default_max_length = generation_config.max_length
        generation_config = super()._prepare_generated_length(
            generation_config,
            has_default_max_length,
            has_default_min_length,
            model_input_name,
            input_ids_length,
            inputs_tensor,
        )
        if has_default_max_length and generation_config.max_new_tokens is None:
            generation_config.max_length = default_max_length + input_ids_length  # the default's, uncapped
        return generation_config

    def _get_stopping_criteria(self, *args, **kwargs):
        criteria = super()._get_stopping_criteria(*args, **kwargs)
        for criterion in criteria:
            if isinstance(criterion, MaxLengthCriteria):
                criterion.max_position_embeddings = None  # no "exceeded the model's predefined maximum length"
        return criteria

    def create_masks_for_generate(self, attention_mask=None, inputs_embeds=None, **kwargs):
        """generate() calls this with a compileable cache (a StaticCache) to turn the 2D mask into the 4D masks of
        transformers' attention; LlamaMem reads the 2D mask itself, so it is passed on as it is. A decode step on a
        fixed-shape cache gets none: the cache keeps which of its window's tokens are padding, generate() passes the
        positions and its new tokens are real, and a mask that grows by a column every step would make the compiled
        step's input shape change every step."""
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        if inputs_embeds.shape[1] == 1 and fixed_slots(cache) is not None:
            return None
        return attention_mask

    @classmethod
    def from_llama(cls, source, **config_overrides) -> "LlamaMemForCausalLM":
        """Convert a Llama-family causal LM into LlamaMem: `import hf_llama_mem` installs the converter here (hub.py).
        The code files saved with a model do not carry it, so a class loaded from them alone has none."""
        raise ImportError(
            "LlamaMemForCausalLM.from_llama needs the hf-llama-mem package, and this class was loaded from a model "
            "folder's code files without it: `pip install hf-llama-mem`, then call "
            "hf_llama_mem.LlamaMemForCausalLM.from_llama(...)."
        )

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        past_key_values: Cache | None = None,
        output_attentions: bool | None = None,
        **kwargs,
    ) -> CausalLMOutputWithPast | tuple:
        """Causal LM forward. `num_items_in_batch` (passed by Trainer through kwargs) and `shift_labels` (pre-shifted
        targets, which Trainer passes under sequence or context parallelism) go to the loss; either `labels` or
        `shift_labels` gives a loss. Padding: left padding is exact, padding between real tokens is refused (see
        `LlamaMemModel.forward`)."""
        check_no_attention_weights(output_attentions, self.config)
        check_not_packed(None, None, 0, kwargs)  # a packed batch's varlen arguments (position_ids: in the model)
        cache = resolve_cache_argument(cache, past_key_values)
        if self.config.memory_write_surprisal_threshold is not None:
            logits, all_hidden_states, cache = surprisal_gated_forward(
                self, input_ids, attention_mask, position_ids, cache, use_cache, output_hidden_states, logits_to_keep
            )
        else:
            outputs = self.model(
                input_ids=input_ids,
                attention_mask=attention_mask,
                position_ids=position_ids,
                cache=cache,
                inputs_embeds=inputs_embeds,
                use_cache=use_cache,
                output_hidden_states=output_hidden_states,
                return_dict=True,
            )
            keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
            logits = self.lm_head(outputs.last_hidden_state[:, keep, :])
            all_hidden_states, cache = outputs.hidden_states, getattr(outputs, CACHE_FIELD)
        loss = None
        # Under sequence/context parallelism Trainer passes pre-shifted targets as `shift_labels` (with or without the
        # labels they came from): the loss is over those, as transformers' ForCausalLMLoss computes it.
        loss_names = ("num_items_in_batch", "ignore_index", "shift_labels")
        loss_kwargs = {k: v for k, v in kwargs.items() if k in loss_names and v is not None}
        if labels is not None or "shift_labels" in loss_kwargs:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **loss_kwargs)
        output = CausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            hidden_states=all_hidden_states,
            **{CACHE_FIELD: cache},
        )
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        return output if return_dict else output.to_tuple()
