"""save_memory / load_memory: keep a model's memory (window + memory matrices) on disk between sessions.

The file is safetensors: per layer the window's keys and stored entries, the key-convolution state and the memory
matrix, plus metadata saying how many tokens it has seen and which model (architecture and a weight fingerprint)
it belongs to. Continuing from a loaded state equals continuing from the original.
"""

import hashlib
import json
import os

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import DynamicCache, PreTrainedModel

from .modeling_llama_mem import CACHE_FIELD

__all__ = ["generate_with_memory", "load_memory", "save_memory"]

FORMAT_VERSION = "1"


def weights_fingerprint(model: PreTrainedModel) -> str:
    """A short hash of the weights that decide what the memory holds (k/v projections and the memory readers)."""
    digest = hashlib.sha256()
    for name, param in sorted(model.named_parameters()):
        if name.endswith(("k_proj.weight", "v_proj.weight")) or ".memory." in name:
            digest.update(name.encode())
            digest.update(param.detach().flatten()[:4096].float().cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


def layout_of_cache(cache: DynamicCache) -> list[dict]:
    return [
        {"sliding_window": layer.sliding_window, "memory": hasattr(layer, "recurrent_states")}
        for layer in cache.layers
    ]


def save_memory(cache: DynamicCache, path: str | os.PathLike, model: PreTrainedModel | None = None) -> None:
    """Write the cache's memory state (window, conv states, memory matrices, tokens seen) to `path`.

    With `model`, the file also records a fingerprint of its weights, and `load_memory` refuses other weights.
    """
    tensors = {}
    for index, layer in enumerate(cache.layers):
        if getattr(layer, "keys", None) is None:
            raise ValueError(f"Cache layer {index} is empty: run the model on some tokens before saving its memory.")
        tensors[f"layers.{index}.keys"] = layer.keys
        tensors[f"layers.{index}.values"] = layer.values
        for kind in ("conv_states", "recurrent_states"):
            state = getattr(layer, kind, {}).get(0)
            if state is not None:
                tensors[f"layers.{index}.{kind}"] = state
    tensors = {name: tensor.detach().contiguous().cpu() for name, tensor in tensors.items()}
    metadata = {
        "format_version": FORMAT_VERSION,
        "seen_tokens": str(cache.get_seq_length()),
        "layout": json.dumps(layout_of_cache(cache)),
        "weights": weights_fingerprint(model) if model is not None else "",
    }
    save_file(tensors, os.fspath(path), metadata=metadata)


def load_memory(path: str | os.PathLike, model: PreTrainedModel) -> DynamicCache:
    """A cache holding the memory saved at `path`, checked to belong to `model`; pass it to forward/generate."""
    with safe_open(os.fspath(path), framework="pt") as handle:
        metadata = handle.metadata() or {}
    if metadata.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path} is not a hf_llama_mem memory file (format {metadata.get('format_version')}).")
    tensors = load_file(os.fspath(path), device=str(model.device))
    cache = DynamicCache(config=model.config)
    check_compatible(metadata, tensors, cache, model, path)
    seen = int(metadata["seen_tokens"])
    conv_taps = model.config.memory_conv_size - 1
    for index, layer in enumerate(cache.layers):
        layer.lazy_initialization(tensors[f"layers.{index}.keys"], tensors[f"layers.{index}.values"])
        layer.keys, layer.values = tensors[f"layers.{index}.keys"], tensors[f"layers.{index}.values"]
        layer.cumulative_length = seen
        if f"layers.{index}.conv_states" in tensors:
            layer.update_conv_state(tensors[f"layers.{index}.conv_states"], conv_kernel_size=conv_taps)
        if f"layers.{index}.recurrent_states" in tensors:
            layer.update_recurrent_state(tensors[f"layers.{index}.recurrent_states"])
    return cache


def check_compatible(metadata: dict, tensors: dict, cache: DynamicCache, model: PreTrainedModel, path) -> None:
    """Refuse a state from another architecture, shape or set of weights, naming the mismatch."""
    saved, expected = json.loads(metadata["layout"]), layout_of_cache(cache)
    if len(saved) != len(expected):
        raise ValueError(f"Memory state {path} has {len(saved)} layers, but this model has {len(expected)}.")
    for index, (was, now) in enumerate(zip(saved, expected, strict=True)):
        for field in ("sliding_window", "memory"):
            if was[field] != now[field]:
                raise ValueError(
                    f"Memory state {path}, layer {index}: saved with {field}={was[field]}, "
                    f"this model has {now[field]}."
                )
    config = model.config
    for index in range(len(expected)):
        keys = tensors[f"layers.{index}.keys"]
        if tuple(keys.shape[1::2]) != (config.num_key_value_heads, config.head_dim):
            raise ValueError(
                f"Memory state {path}, layer {index}: keys of shape {tuple(keys.shape)}, expected "
                f"[batch, {config.num_key_value_heads}, tokens, {config.head_dim}] for this model."
            )
    if metadata["weights"] and metadata["weights"] != weights_fingerprint(model):
        raise ValueError(
            f"Memory state {path} was written by a model with other weights (fingerprint {metadata['weights']}, "
            f"this model {weights_fingerprint(model)})."
        )


def generate_with_memory(
    model: PreTrainedModel, input_ids: torch.LongTensor, cache: DynamicCache | None = None, **generate_kwargs
) -> tuple[torch.LongTensor, DynamicCache]:
    """generate() continuing `cache` (everything the model has read so far, e.g. from `load_memory` or the previous
    turn) with only the new `input_ids` [B, n]. Returns the new tokens and the cache, which has then read every one
    of them (generate() leaves the last generated token unread; it is fed here), ready for the next turn.

    generate() expects the ids of the whole history and feeds only those the cache has not seen; the history itself
    is not needed (the cache holds what is left of it), so the seen positions are filled with placeholders.
    """
    past = cache.get_seq_length() if cache is not None else 0
    ids = torch.cat([input_ids.new_zeros(input_ids.shape[0], past), input_ids], dim=1)
    output = model.generate(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        return_dict_in_generate=True,
        **{CACHE_FIELD: cache},
        **generate_kwargs,
    )
    new_tokens, cache = output.sequences[:, ids.shape[1] :], getattr(output, CACHE_FIELD)
    with torch.no_grad():
        model(input_ids=new_tokens[:, -1:], cache=cache, use_cache=True)
    return new_tokens, cache
