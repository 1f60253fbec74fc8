"""Conversion of a pretrained Llama-family checkpoint (Llama, Mistral) into LlamaMem.

Every source tensor is copied exactly once under the same name; the only new tensors are under `.memory.`, and the
memory gates start closed, so the converted model computes exactly the source with a W-token sliding window until
it is trained.
"""

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

from .configuration_llama_mem import LlamaMemConfig

SOURCE_MODEL_TYPES = ("llama", "mistral")
# Fields of the source config that carry over; anything else (the memory settings) comes from LlamaMemConfig.
COPIED_FIELDS = (
    "vocab_size hidden_size intermediate_size num_hidden_layers num_attention_heads num_key_value_heads hidden_act "
    "max_position_embeddings initializer_range rms_norm_eps pad_token_id bos_token_id eos_token_id "
    "tie_word_embeddings rope_parameters attention_bias attention_dropout mlp_bias head_dim"
).split()


def load_source(source: str | PreTrainedModel) -> PreTrainedModel:
    """A Llama-family causal LM from an instance, a local folder or a hub id; anything else is refused."""
    config = source.config if isinstance(source, PreTrainedModel) else AutoConfig.from_pretrained(source)
    if config.model_type not in SOURCE_MODEL_TYPES:
        raise ValueError(
            f"Expected a Llama-family causal LM (model_type one of {SOURCE_MODEL_TYPES}), got model_type "
            f"{config.model_type!r}."
        )
    if isinstance(source, PreTrainedModel):
        if not hasattr(source, "lm_head"):
            raise ValueError(
                f"Expected a causal LM with an lm_head (e.g. LlamaForCausalLM), got {type(source).__name__}."
            )
        return source
    return AutoModelForCausalLM.from_pretrained(source, dtype="auto")


def converted_config(source_config, **overrides) -> LlamaMemConfig:
    settings = {name: getattr(source_config, name) for name in COPIED_FIELDS if hasattr(source_config, name)}
    window = getattr(source_config, "sliding_window", None)
    if window is not None:
        settings["sliding_window"] = window
    settings.update(overrides)
    return LlamaMemConfig(**settings)


def copy_source_weights(target: PreTrainedModel, source: PreTrainedModel) -> None:
    """Copy every source tensor into the tensor of the same name; error on any unused or missing name."""
    source_state = source.state_dict()
    target_state = target.state_dict()
    expected = {name for name in target_state if ".memory." not in name}
    if target.config.tie_word_embeddings:
        expected.discard("lm_head.weight")
        source_state.pop("lm_head.weight", None)
    unused, missing = sorted(set(source_state) - expected), sorted(expected - set(source_state))
    if unused or missing:
        raise ValueError(f"Source and target weights differ: unused source tensors {unused}, missing {missing}.")
    with torch.no_grad():
        for name in expected:
            if target_state[name].shape != source_state[name].shape:
                raise ValueError(
                    f"{name}: source shape {tuple(source_state[name].shape)} != "
                    f"target {tuple(target_state[name].shape)}."
                )
            target_state[name].copy_(source_state[name])


def convert_from_llama(model_class, source: str | PreTrainedModel, **config_overrides) -> PreTrainedModel:
    """Build `model_class` (LlamaMemForCausalLM) from a Llama-family model, memory gates closed."""
    source = load_source(source)
    config = converted_config(source.config, **config_overrides)
    config._attn_implementation = source.config._attn_implementation
    dtype = source.get_input_embeddings().weight.dtype
    target = model_class(config).to(dtype)
    copy_source_weights(target, source)
    with torch.no_grad():
        for name, param in target.named_parameters():
            if name.endswith(".memory.gate"):
                param.zero_()  # closed: the memory branch adds exactly zero until training opens it
    return target.eval() if not source.training else target


def verify_conversion(source: PreTrainedModel, converted: PreTrainedModel, num_sequences: int = 3) -> dict:
    """Check, on random sequences of W tokens (capped at 256), that the converted model gives the source's logits.

    Within the window the two must agree exactly; beyond it the source sees more than W tokens and they differ by
    design (the tests compare that part against transformers' sliding-window Mistral).
    """
    window = min(converted.config.sliding_window, 256)
    generator = torch.Generator().manual_seed(0)
    worst = 0.0
    with torch.no_grad():
        for _ in range(num_sequences):
            ids = torch.randint(0, converted.config.vocab_size, (1, window), generator=generator)
            ids = ids.to(converted.device)
            diff = (converted(ids).logits.float() - source(ids).logits.float()).abs().max()
            worst = max(worst, diff.item())
    tolerance = 1e-4 if converted.dtype == torch.float32 else 5e-2
    if worst > tolerance:
        raise ValueError(f"Converted model differs from the source by {worst:.3e} (tolerance {tolerance:.0e}).")
    return {"checked_sequences": num_sequences, "checked_length": window, "max_abs_logit_diff": worst}
