"""save_memory / load_memory: keep a model's memory (window + memory matrices) on disk between sessions;
generate_with_memory: continue that memory turn after turn.

The file is safetensors: per layer the window's keys and values, on a memory layer the memory entries of the same
tokens (float32), the key-convolution state and the memory matrix, plus metadata saying how many tokens it has seen and
which model (architecture and a weight fingerprint) it belongs to. A cache that `generate_with_memory` built also keeps
the ids and attention mask of every token it has read (its history), and the file keeps them too. With writes gated
by surprisal (memory_write_surprisal_threshold), the file also keeps the gate's state: the windowed pass's keys and
values per layer (`windowed.layers.{i}.*`) and its prediction of the next token (`windowed.next_token_log_probs`,
float32 [B, vocab]), so the first token after a load is gated as it would have been. Continuing from a loaded state
equals continuing from the original.

What a continued generation sees of its history: generate() needs the ids of the whole history (it feeds only those
the cache has not read, and its logits processors read the rest), so `generate_with_memory` passes the recorded ids
and mask, and every processor (repetition_penalty, no_repeat_ngram_size, ...) sees what generate() over the whole
conversation sees. The history costs 9 bytes a token in the file (an int64 id and a bool mask entry), 16 in memory,
where generate() needs ids and mask of that length on every call anyway; the model's own state stays constant. A
cache without a recorded history (a plain forward's) gets placeholder ids, and the processors that would read them
are refused by name.

The weight fingerprint is a SHA-256 of every element of every weight the saved state depends on (the embedding and
every decoder layer; not the final norm or the LM head), each cast to bfloat16 first: the same weights at another
precision (a bf16 copy of an fp32 model, and back) are the same model and share it, while any change larger than
bf16 rounding is refused as other weights. A float16 copy may round differently and can be refused. The weights are
read through accelerate's offload hooks, so a model offloaded to disk (meta tensors) saves and loads its memory.
It reads every weight once per save_memory(model=...) and load_memory: about 0.5 s per 100M parameters on one busy
CPU core (measured: a 58M model in 0.31 s; so a 135M model under a second, a 7B model about half a minute).
"""

import hashlib
import json
import os
from dataclasses import dataclass

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import DynamicCache, GenerationConfig, PreTrainedModel

from .fixed_cache import FixedWindowLayer
from .modeling_llama_mem import CACHE_FIELD
from .surprisal_writes import gate_state_layer

__all__ = ["TokenHistory", "generate_with_memory", "load_memory", "save_memory", "token_history"]

FORMAT_VERSION = "3"
# Formats this version no longer reads, and what was different in them.
OLD_FORMATS = {
    "1": "whose weight fingerprint covered only part of the weights",
    "2": "which kept the memory's entries inside the window values",
}
STATE_KINDS = ("keys", "values", "memory_entries", "conv_states", "recurrent_states")
# Per-token tensors of the window, [B, Hkv, tokens, ...]: each holds min(seen_tokens, W - 1) tokens.
WINDOW_KINDS = ("keys", "values", "memory_entries")
# Kept in float32 whatever the model dtype.
FLOAT32_KINDS = ("memory_entries", "recurrent_states", "next_token_log_probs")
# The gate's state, with writes gated by surprisal (surprisal_writes.py).
WINDOWED_PREFIX, NEXT_TOKEN_LOG_PROBS = "windowed.layers", "windowed.next_token_log_probs"
HISTORY_IDS, HISTORY_MASK = "history.input_ids", "history.attention_mask"
REQUIRED_METADATA = ("format_version", "seen_tokens", "layout", "weights")
# Tokens of the forward that shows which state the model keeps (`reference_cache`).
REFERENCE_TOKENS = 8
# Elements hashed per step: bounds the bf16 copy of one large weight (the embedding) to 32 MB.
FINGERPRINT_CHUNK = 2**24


# ---- the history: ids and mask of every token the cache has read ----


@dataclass
class TokenHistory:
    """The ids [B, n] and attention mask [B, n] (1 = token, 0 = padding) of the n tokens a cache has read."""

    input_ids: torch.LongTensor
    attention_mask: torch.LongTensor


def token_history(cache: DynamicCache | None) -> TokenHistory | None:
    """The recorded history of `cache`, or None where there is none or it no longer matches what the cache read
    (the cache was run on more tokens outside `generate_with_memory`)."""
    history = getattr(cache, "llama_mem_history", None)
    if history is None or history.input_ids.shape[1] != cache.get_seq_length():
        return None
    return history


def set_token_history(cache: DynamicCache, history: TokenHistory) -> None:
    cache.llama_mem_history = history


# ---- the weight fingerprint ----


def decoder_of(model: torch.nn.Module) -> torch.nn.Module:
    """The decoder (embed_tokens + layers) inside a causal LM, a base model or a wrapper such as PEFT's."""
    for module in model.modules():
        if hasattr(module, "embed_tokens") and hasattr(module, "layers"):
            return module
    raise ValueError(f"{type(model).__name__} has no decoder with embed_tokens and layers: is it a LlamaMem model?")


def state_weights(model: torch.nn.Module):
    """(name, tensor) for every weight that decides what the cache holds, each readable even when offloaded: the
    module's own parameters are brought in through accelerate's hooks (`align_module_device`) while it is read."""
    decoder = decoder_of(model)
    for prefix in ("embed_tokens", "layers"):
        root = decoder.get_submodule(prefix)
        names = sorted(name for name, _ in root.named_parameters())  # named once, also where tied
        by_module: dict[str, list[str]] = {}
        for name in names:
            module_name, _, leaf = name.rpartition(".")
            by_module.setdefault(module_name, []).append(leaf)
        for module_name, leaves in by_module.items():
            module = root.get_submodule(module_name) if module_name else root
            with _materialised(module):
                for leaf in leaves:
                    yield (
                        f"{prefix}.{module_name}.{leaf}" if module_name else f"{prefix}.{leaf}",
                        getattr(module, leaf),
                    )


def _materialised(module: torch.nn.Module):
    try:
        from accelerate.utils import align_module_device
    except ImportError:  # without accelerate nothing is offloaded
        import contextlib

        return contextlib.nullcontext()
    return align_module_device(module)


def weights_fingerprint(model: PreTrainedModel) -> str:
    """SHA-256 of every element (cast to bfloat16) of every weight the cached state depends on (module docstring)."""
    digest = hashlib.sha256()
    for name, weight in state_weights(model):
        if weight.device.type == "meta":
            raise ValueError(
                f"Weight {name} is on the meta device and no offload hook provides it: cannot fingerprint."
            )
        digest.update(f"{name}:{tuple(weight.shape)};".encode())
        flat = weight.detach().reshape(-1)
        for start in range(0, flat.numel(), FINGERPRINT_CHUNK):
            piece = flat[start : start + FINGERPRINT_CHUNK].to(device="cpu", dtype=torch.bfloat16)
            digest.update(piece.view(torch.int16).numpy())
    return digest.hexdigest()[:32]


# ---- save and load ----


def layout_of_cache(cache: DynamicCache) -> list[dict]:
    return [
        {"sliding_window": layer.sliding_window, "memory": hasattr(layer, "recurrent_states")}
        for layer in cache.layers
    ]


def layer_states(layer) -> dict[str, torch.Tensor]:
    """The tensors of one cache layer that a memory file keeps, by kind (STATE_KINDS)."""
    states = {kind: getattr(layer, kind, None) for kind in WINDOW_KINDS}
    for kind in ("conv_states", "recurrent_states"):
        states[kind] = getattr(layer, kind, {}).get(0)
    return {kind: tensor for kind, tensor in states.items() if tensor is not None}


def cache_states(cache: DynamicCache) -> dict[str, tuple[str, torch.Tensor]]:
    """name -> (kind, tensor) of every tensor of `cache` a memory file keeps, the history aside: each layer's
    (`layers.{i}.{kind}`), then the gate's state where writes are gated by surprisal."""
    states = {}
    gate = gate_state_layer(cache)
    windowed = gate.windowed_cache if gate is not None else None
    for prefix, layers in (("layers", cache.layers), (WINDOWED_PREFIX, windowed.layers if windowed else [])):
        for index, layer in enumerate(layers):
            for kind, tensor in layer_states(layer).items():
                states[f"{prefix}.{index}.{kind}"] = (kind, tensor)
    if windowed is not None and gate.next_token_log_probs is not None:
        states[NEXT_TOKEN_LOG_PROBS] = ("next_token_log_probs", gate.next_token_log_probs)
    return states


def save_memory(cache: DynamicCache, path: str | os.PathLike, model: PreTrainedModel | None = None) -> None:
    """Write the cache's memory state (window, conv states, memory matrices, tokens seen, and the token history when
    the cache has one) to `path`.

    With `model`, the file also records a fingerprint of its weights, and `load_memory` refuses other weights.
    """
    if any(isinstance(layer, FixedWindowLayer) for layer in cache.layers):
        raise ValueError(
            "save_memory saves a DynamicCache; this is a StaticCache (fixed-shape slots, some of them empty): run the "
            "conversation with DynamicCache(config=model.config) to keep its memory."
        )
    for index, layer in enumerate(cache.layers):
        if getattr(layer, "keys", None) is None:
            raise ValueError(f"Cache layer {index} is empty: run the model on some tokens before saving its memory.")
    tensors = {name: tensor for name, (_, tensor) in cache_states(cache).items()}
    history = token_history(cache)
    if history is not None:
        tensors[HISTORY_IDS], tensors[HISTORY_MASK] = history.input_ids, history.attention_mask.bool()
    tensors = {name: tensor.detach().contiguous().cpu() for name, tensor in tensors.items()}
    metadata = {
        "format_version": FORMAT_VERSION,
        "seen_tokens": str(cache.get_seq_length()),
        "layout": json.dumps(layout_of_cache(cache)),
        "weights": weights_fingerprint(model) if model is not None else "",
    }
    save_file(tensors, os.fspath(path), metadata=metadata)


def load_memory(path: str | os.PathLike, model: PreTrainedModel) -> DynamicCache:
    """A cache holding the memory saved at `path`, checked to belong to `model`; pass it to forward/generate.

    Refused with a ValueError naming the problem: a file of another format, missing or malformed metadata, a state
    from another architecture or other weights, a missing, unexpected, mis-shaped or wrongly typed tensor, a window
    longer than the model's, a token count that does not match the window. Window tensors saved at another floating
    precision are cast to this model's dtype (the same weights at another precision share the fingerprint); the
    memory entries and matrices are float32 in every file.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"No memory file at {path}.")
    try:
        with safe_open(os.fspath(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
    except Exception as error:  # safetensors raises its own error type for a file that is not safetensors
        raise ValueError(f"{path} is not a safetensors file, so not a hf_llama_mem memory file ({error}).") from None
    seen, layout = check_metadata(metadata, path)
    tensors = load_file(os.fspath(path))
    reference = reference_cache(model)
    check_layout(layout, layout_of_cache(reference), path)
    check_tensors(tensors, reference, seen, model.config, path)
    if metadata["weights"] and metadata["weights"] != weights_fingerprint(model):
        raise ValueError(
            f"Memory state {path} was written by a model with other weights (fingerprint {metadata['weights']}, "
            f"this model {weights_fingerprint(model)})."
        )
    cache = DynamicCache(config=model.config)
    conv_taps = model.config.memory_conv_size - 1
    cache.layers = restored_layers(reference.layers, tensors, "layers", seen, conv_taps)
    reference_gate = gate_state_layer(reference)
    if reference_gate is not None and reference_gate.windowed_cache is not None:
        # The gate's state: the windowed pass's cache and its last prediction, into the first memory layer.
        windowed = DynamicCache()
        windowed.layers = restored_layers(reference_gate.windowed_cache.layers, tensors, WINDOWED_PREFIX, seen, 0)
        windowed.layer_class_to_replicate = None
        gate = gate_state_layer(cache)
        gate.windowed_cache = windowed
        gate.next_token_log_probs = tensors[NEXT_TOKEN_LOG_PROBS].to(reference_gate.next_token_log_probs.device)
    if HISTORY_IDS in tensors:
        device = reference.layers[0].keys.device
        ids, mask = tensors[HISTORY_IDS].to(device), tensors[HISTORY_MASK].to(device=device, dtype=torch.long)
        set_token_history(cache, TokenHistory(ids, mask))
    return cache


def restored_layers(references: list, tensors: dict, prefix: str, seen: int, conv_taps: int) -> list:
    """Cache layers of the classes the model itself uses (its forward put `references` in the reference cache),
    holding the checked file's `{prefix}.{i}.{kind}` tensors at the reference's devices and dtypes."""
    layers = []
    for index, like in enumerate(references):
        layer = type(like)(sliding_window=like.sliding_window)
        saved = {
            kind: tensors[f"{prefix}.{index}.{kind}"].to(device=tensor.device, dtype=tensor.dtype)
            for kind, tensor in layer_states(like).items()
        }
        layer.lazy_initialization(saved["keys"], saved["values"])
        layer.keys, layer.values = saved["keys"], saved["values"]
        layer.cumulative_length = seen
        if "memory_entries" in saved:
            layer.memory_entries = saved["memory_entries"]
        if "conv_states" in saved:
            layer.update_conv_state(saved["conv_states"], conv_kernel_size=conv_taps)
        if "recurrent_states" in saved:
            layer.update_recurrent_state(saved["recurrent_states"])
        layers.append(layer)
    return layers


def check_metadata(metadata: dict, path) -> tuple[int, list[dict]]:
    """The tokens seen and the saved layout, from metadata checked field by field."""
    version = metadata.get("format_version")
    if version != FORMAT_VERSION:
        if version in OLD_FORMATS:
            raise ValueError(
                f"{path} is a memory file of format {version} (an earlier hf_llama_mem, {OLD_FORMATS[version]}); "
                f"this version reads format {FORMAT_VERSION}: re-create the memory."
            )
        raise ValueError(f"{path} is not a hf_llama_mem memory file (format {version!r}, expected {FORMAT_VERSION}).")
    for key in REQUIRED_METADATA:
        if key not in metadata:
            raise ValueError(
                f"Memory state {path} has no {key!r} in its metadata (a file save_memory did not write?)."
            )
    seen = metadata["seen_tokens"]
    if not seen.isdigit():
        raise ValueError(f"Memory state {path}: seen_tokens must be a whole number >= 0, got {seen!r}.")
    try:
        layout = json.loads(metadata["layout"])
    except json.JSONDecodeError as error:
        raise ValueError(f"Memory state {path}: its layout is not valid JSON ({error}).") from None
    if not isinstance(layout, list) or not all(
        isinstance(entry, dict) and {"sliding_window", "memory"} <= entry.keys() for entry in layout
    ):
        raise ValueError(
            f"Memory state {path}: its layout must list one {{'sliding_window', 'memory'}} entry per layer, "
            f"got {metadata['layout']!r}."
        )
    return int(seen), layout


def check_layout(saved: list[dict], expected: list[dict], path) -> None:
    """Refuse a state from another architecture, naming the mismatch."""
    if len(saved) != len(expected):
        raise ValueError(f"Memory state {path} has {len(saved)} layers, but this model has {len(expected)}.")
    for index, (was, now) in enumerate(zip(saved, expected, strict=True)):
        for field in ("sliding_window", "memory"):
            if was[field] != now[field]:
                raise ValueError(
                    f"Memory state {path}, layer {index}: saved with {field}={was[field]}, "
                    f"this model has {now[field]}."
                )


@torch.no_grad()
def reference_cache(model: PreTrainedModel) -> DynamicCache:
    """The cache `model` builds from a few tokens: which tensors each layer keeps, their dtypes and devices, and
    every dimension but the batch and the window's token count. Following the model rather than a copy of its layout
    keeps the checks right wherever the model stores its state, and gives the cache layer classes it uses."""
    cache = DynamicCache(config=model.config)
    embedding = model.get_input_embeddings().weight
    device = embedding.device if embedding.device.type != "meta" else torch.device("cpu")
    ids = torch.zeros(1, REFERENCE_TOKENS, dtype=torch.long, device=device)
    model(input_ids=ids, **{CACHE_FIELD: cache}, use_cache=True)
    return cache


def check_tensors(tensors: dict, reference: DynamicCache, seen: int, config, path) -> None:
    """Every tensor the model keeps is there, with its dtype and shape, one batch, and a window that matches `seen`."""
    window = min(seen, config.sliding_window - 1)
    expected = cache_states(reference)
    if NEXT_TOKEN_LOG_PROBS in expected and NEXT_TOKEN_LOG_PROBS not in tensors:
        raise ValueError(
            f"Memory state {path} has no state of surprisal-gated writes (windowed.*): a model without them saved it, "
            f"and this model has memory_write_surprisal_threshold={config.memory_write_surprisal_threshold}. Load it "
            f"into the model with the threshold set to None."
        )
    if NEXT_TOKEN_LOG_PROBS in tensors and NEXT_TOKEN_LOG_PROBS not in expected:
        raise ValueError(
            f"Memory state {path} holds the state of surprisal-gated writes (windowed.*), and this model has "
            f"memory_write_surprisal_threshold=None: load it into a model with the threshold it was saved with."
        )
    batch = None
    for name, (kind, like) in expected.items():
        if name not in tensors:
            raise ValueError(f"Memory state {path}: {name} is missing (this model keeps one).")
        tensor = tensors[name]
        if kind in FLOAT32_KINDS and tensor.dtype != torch.float32:
            raise ValueError(
                f"Memory state {path}: {name} has dtype {tensor.dtype}, expected torch.float32 (the memory "
                f"entries and matrices, and the surprisal gate's next-token log-probabilities, are kept in float32 "
                f"whatever the model dtype)."
            )
        if not tensor.dtype.is_floating_point:
            raise ValueError(
                f"Memory state {path}: {name} has dtype {tensor.dtype}, expected a floating-point dtype "
                f"({like.dtype} in this model)."
            )
        if tensor.dim() != like.dim():
            raise ValueError(
                f"Memory state {path}: {name} has shape {tuple(tensor.shape)}, expected {like.dim()} dimensions."
            )
        batch = tensor.shape[0] if batch is None else batch
        if tensor.shape[0] != batch:
            raise ValueError(
                f"Memory state {path}: {name} holds a batch of {tensor.shape[0]}, but the tensors before it a "
                f"batch of {batch}."
            )
        if kind in WINDOW_KINDS:
            tokens = tensor.shape[2]
            if tokens > config.sliding_window - 1:
                raise ValueError(
                    f"Memory state {path}: {name} holds {tokens} window tokens, but a window of "
                    f"{config.sliding_window} keeps at most {config.sliding_window - 1}."
                )
            if tokens != window:
                raise ValueError(
                    f"Memory state {path}: seen_tokens={seen} but {name} holds {tokens} window tokens "
                    f"(expected min(seen_tokens, sliding_window - 1) = {window})."
                )
            same = tensor.shape[1] == like.shape[1] and tensor.shape[3:] == like.shape[3:]
            shown = f"[batch, {like.shape[1]}, tokens, {', '.join(map(str, like.shape[3:]))}]"
        else:
            same = tensor.shape[1:] == like.shape[1:]
            shown = f"[batch, {', '.join(map(str, like.shape[1:]))}]"
        if not same:
            raise ValueError(
                f"Memory state {path}: {name} has shape {tuple(tensor.shape)}, expected {shown} for this model."
            )
    history_names = {HISTORY_IDS, HISTORY_MASK} & tensors.keys()
    for name in sorted(tensors.keys() - expected.keys() - {HISTORY_IDS, HISTORY_MASK}):
        raise ValueError(f"Memory state {path}: unexpected tensor {name!r} (this model keeps no such state).")
    if history_names:
        check_history(tensors, history_names, batch, seen, config, path)


def check_history(tensors: dict, names: set, batch: int, seen: int, config, path) -> None:
    if names != {HISTORY_IDS, HISTORY_MASK}:
        (missing,) = {HISTORY_IDS, HISTORY_MASK} - names
        raise ValueError(f"Memory state {path}: {missing} is missing (the history is kept as ids and mask).")
    ids, mask = tensors[HISTORY_IDS], tensors[HISTORY_MASK]
    for name, tensor in ((HISTORY_IDS, ids), (HISTORY_MASK, mask)):
        if tuple(tensor.shape) != (batch, seen):
            raise ValueError(
                f"Memory state {path}: {name} has shape {tuple(tensor.shape)}, expected [{batch}, {seen}] "
                f"(batch, seen_tokens)."
            )
    if ids.dtype != torch.int64 or mask.dtype != torch.bool:
        raise ValueError(
            f"Memory state {path}: the history must be int64 ids and a bool mask, got {ids.dtype} and {mask.dtype}."
        )
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= config.vocab_size):
        raise ValueError(f"Memory state {path}: {HISTORY_IDS} holds ids outside [0, vocab_size={config.vocab_size}).")


# ---- generation over turns ----

# Generation settings whose logits processors or stopping criteria read the ids of the history, with the value that
# switches each off.
HISTORY_READERS = {
    "repetition_penalty": 1.0,
    "no_repeat_ngram_size": 0,
    "sequence_bias": None,
    "bad_words_ids": None,
    "stop_strings": None,
    "watermarking_config": None,
}


def generate_with_memory(
    model: PreTrainedModel,
    input_ids: torch.LongTensor,
    cache: DynamicCache | None = None,
    attention_mask: torch.LongTensor | None = None,
    **generate_kwargs,
) -> tuple[torch.LongTensor, DynamicCache]:
    """generate() continuing `cache` (everything the model has read so far, e.g. from `load_memory` or the previous
    turn) with only the new `input_ids` [B, n], n >= 1. Returns the new tokens and the cache, which has then read
    every one of them (generate() leaves the last generated token unread; it is fed here), ready for the next turn.

    The reply equals generate() over the whole history, logits processors included: the cache keeps the ids and mask
    of every token it has read (module docstring). `attention_mask` is that of the new tokens [B, n] (or of the whole
    history [B, past + n]); a left-padded first turn gives each row exactly what the row alone gives. With a cache
    that has no recorded history (a plain forward's), the history is placeholders, the processors that would read it
    are refused, and padding in it must be passed as a whole-history mask.

    Refused before anything is read: an empty turn (the cache has read every token, the last one included, so there
    is none left to generate from; pass at least one new token), a batch other than the cache's, and several
    sequences per row (num_beams > 1, num_return_sequences > 1: one cache row cannot continue several sequences).
    """
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must have shape [batch, new tokens], got {tuple(input_ids.shape)}.")
    batch, new = input_ids.shape
    if new == 0:
        raise ValueError(
            "generate_with_memory got no new token (input_ids of shape "
            f"{list(input_ids.shape)}): the cache has read every token so far, the last one included, so there is "
            "none left to generate from. Pass at least one new token."
        )
    for name in ("input_ids", "past_key_values", "cache", "return_dict_in_generate"):
        if name in generate_kwargs:
            raise ValueError(f"generate_with_memory sets {name} itself: pass the cache as its third argument.")
    past = cache.get_seq_length() if cache is not None else 0
    cache_batch = next((keys.shape[0] for keys in window_keys(cache)), batch) if past else batch
    if cache_batch != batch:
        raise ValueError(f"The cache holds a batch of {cache_batch} sequences, but input_ids has {batch}.")
    settings = effective_generation_config(model, generate_kwargs)
    for name in ("num_beams", "num_return_sequences"):
        if (getattr(settings, name, 1) or 1) > 1:
            raise ValueError(
                f"generate_with_memory continues one cache row per sequence, so {name}={getattr(settings, name)} is "
                f"not supported (the cache would hold one row per beam or sample): use {name}=1, or generate() over "
                f"the whole history."
            )

    history = token_history(cache) if past else TokenHistory(input_ids[:, :0], input_ids[:, :0])
    stale = getattr(cache, "llama_mem_history", None) if history is None else None
    whole = attention_mask is not None and attention_mask.shape[-1] == past + new
    if stale is not None and not bool(stale.attention_mask.all()) and not whole:
        raise ValueError(
            f"The cache has read {past - stale.input_ids.shape[1]} tokens outside generate_with_memory after a padded "
            f"history, so its recorded mask no longer covers what it read: pass attention_mask for the whole history "
            f"[{batch}, {past + new}]."
        )
    if history is None:
        readers = [name for name, off in HISTORY_READERS.items() if getattr(settings, name, off) not in (off, None)]
        if generate_kwargs.get("prefix_allowed_tokens_fn") is not None:
            readers.append("prefix_allowed_tokens_fn")
        if readers:
            raise ValueError(
                f"{', '.join(readers)} read the ids of the whole history, which this cache does not keep (it was not "
                f"built by generate_with_memory or load_memory of such a file): continue a cache that "
                f"generate_with_memory returned, or drop {', '.join(readers)}."
            )
        history = TokenHistory(input_ids.new_zeros(batch, past), input_ids.new_ones(batch, past))
    ids = torch.cat([history.input_ids.to(input_ids.device), input_ids], dim=1)
    mask = whole_mask(attention_mask, history, input_ids)

    output = model.generate(
        input_ids=ids, attention_mask=mask, return_dict_in_generate=True, **{CACHE_FIELD: cache}, **generate_kwargs
    )
    sequences, cache = output.sequences, getattr(output, CACHE_FIELD)
    mask = torch.cat([mask, mask.new_ones(batch, sequences.shape[1] - ids.shape[1])], dim=1)
    unread = sequences[:, cache.get_seq_length() :]  # the last generated token (more if nothing was generated)
    if unread.shape[1]:
        with torch.no_grad():
            model(input_ids=unread, attention_mask=mask, **{CACHE_FIELD: cache}, use_cache=True)
    set_token_history(cache, TokenHistory(sequences, mask))
    return sequences[:, ids.shape[1] :], cache


def window_keys(cache: DynamicCache):
    return (keys for keys in (getattr(layer, "keys", None) for layer in cache.layers) if keys is not None)


def effective_generation_config(model: PreTrainedModel, generate_kwargs: dict) -> GenerationConfig:
    """The settings generate() will use: its generation_config (or the model's) updated with the keyword arguments."""
    import copy

    base = generate_kwargs.get("generation_config") or model.generation_config
    settings = copy.deepcopy(base)
    settings.update(**{key: value for key, value in generate_kwargs.items() if key != "generation_config"})
    return settings


def whole_mask(attention_mask, history: TokenHistory, input_ids: torch.LongTensor) -> torch.LongTensor:
    """The attention mask of the history and the new tokens, [B, past + n], from the mask of the new ones or of all."""
    batch, new = input_ids.shape
    past = history.input_ids.shape[1]
    if attention_mask is None:
        attention_mask = input_ids.new_ones(batch, new)
    if attention_mask.shape == (batch, past + new):
        return attention_mask.to(device=input_ids.device, dtype=torch.long)
    if attention_mask.shape != (batch, new):
        raise ValueError(
            f"attention_mask must cover the new tokens [{batch}, {new}] or the whole history [{batch}, {past + new}], "
            f"got {list(attention_mask.shape)}."
        )
    return torch.cat([history.attention_mask.to(input_ids.device), attention_mask.to(input_ids.device)], 1).long()
