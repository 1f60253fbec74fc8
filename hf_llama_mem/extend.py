"""The long-context fine-tuning recipe: train what a converted model's memory needs, and ship it as a small delta.

    from hf_llama_mem.extend import ExtendSettings, extend, apply_delta
    delta = extend("SmolLM2-135M-Instruct.Q4_1.gguf", "extend_output", ExtendSettings(steps=200))
    model = LlamaMemForCausalLM.from_llama(source, **delta_conversion(delta))  # W, rule, layers, rank of the delta
    apply_delta(model, delta)  # the trained memory (and LoRA, merged into q/k/v) on a fresh conversion

`extend(src, output_dir, settings)` loads SRC (a LlamaMem folder, or any Llama-family folder, hub id, .gguf file or
model, converted with `LlamaMemForCausalLM.from_llama(src, sliding_window=W, memory_layers=...)`), freezes
everything except the memory parameters (and, optionally, LoRA factors on the attention projections), and trains
them with AdamW on the samples of `hf_llama_mem.long_context_data` (passkeys, several needles with distractors,
key-value lookups, variable tracking: loss on the answer only; long natural text: loss on every token), each sample
weighing the same in the loss. Into `output_dir` it writes:

- `checkpoints/step-NNNNNN/`: the trained tensors, optimizer, scheduler, RNG states and data-stream state, every
  `checkpoint_every` steps (written to a temporary folder, then renamed, so a checkpoint is whole or absent); a
  rerun with the same settings resumes from the latest and ends as an uninterrupted run would;
- `log.jsonl`: per step the loss (and per kind), mean |gate|, learning rate, sample length and seconds; with
  `eval_every`, the loss and answer accuracy on a fixed batch of held-out samples;
- `loss_gate.png`: the loss and mean |gate| by step;
- `settings.json` and `memory_delta.safetensors`: the delta, only the memory tensors and the LoRA A/B factors
  (a few MB), with metadata recording what applying it needs and what produced it (`read_delta_metadata`).

`apply_delta(model, path)` checks a LlamaMem model against the delta's metadata (window, memory layers, memory
rule, dimensions, tensor shapes), loads the memory tensors and merges the LoRA factors into the projections as PEFT
merges them (W + B @ A * alpha / r).
"""

import argparse
import dataclasses
import hashlib
import json
import math
import os
import random
import shlex
import shutil
import sys
import time
import types
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, PreTrainedModel
from transformers.utils import logging

from .long_context_data import (
    KINDS,
    RETRIEVAL_KINDS,
    LengthCurriculum,
    LongContextData,
    LongContextStream,
    Mix,
    NaturalText,
    as_tensors,
    sample_seed,
)
from .memory_layer import LlamaMemMemory
from .training import memory_parameter_groups

logger = logging.get_logger(__name__)

__all__ = [
    "DELTA_FILE",
    "ExtendSettings",
    "add_extend_parser",
    "apply_delta",
    "delta_conversion",
    "delta_tensors",
    "extend",
    "read_delta_metadata",
]

DELTA_FILE = "memory_delta.safetensors"
DELTA_FORMAT = "hf_llama_mem.memory_delta"
DELTA_FORMAT_VERSION = "1"
# Settings that may change between a run and its resumption (they do not change what is trained).
RESUMABLE_CHANGES = (
    "checkpoint_every", "keep_checkpoints", "eval_every", "eval_samples", "progress", "save_model", "stop_at",
)  # fmt: skip
# Source config fields recorded in the delta and checked when it is applied.
SOURCE_FIELDS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
)
# How `extend` converts a Llama-family SRC unless told otherwise (a LlamaMem SRC keeps its own), each measured on
# SmolLM2 (README, "Long context from a pretrained Llama"): W = 256; the delta rule without decay, since a passkey must
# survive any number of later writes and a decay initialised for language modelling forgets within hundreds of
# tokens; a first write strength of sigmoid(-3) = 0.05, so filler does not overwrite the memory before the write
# projection has learned what to keep; and rank-16 corrections to the memory's query and key, which learned passkey
# retrieval several times faster than the attention's own q and k (the same steps, the same data).
DEFAULT_WINDOW = 256
RECIPE_MIX = {"passkey": 1.0}
DEFAULT_CONVERSION = {
    "memory_rule": "delta",
    "memory_projection_rank": 16,
    "memory_centering": True,
    "memory_token_gate": False,
}
# Tokens of training text the memory's centring offsets are calibrated on (calibrate_centering).
CENTERING_TOKENS = 2048
DEFAULT_WRITE_BIAS = -3.0
# The write-strength logits `write_supervision` asks for. A delta-rule write of strength beta erases about
# beta * c^2 of what is stored along its key (c: the keys' cosine), so a needle outlives about 1 / (beta c^2) filler
# writes: at c^2 ~ 0.3 (v4's keys) a filler logit of -10 (beta 4.5e-5) keeps a needle past 64K tokens, while a
# statement written at +2 (beta 0.88) replaces what its key held.
FILLER_WRITE_LOGIT = -10.0
STATEMENT_WRITE_LOGIT = 2.0
# The filler's side of that hinge weighs this much more than the statements': where a layer's hidden state cannot
# tell a statement's "the" from the haystack's, an even weighting holds both writes where they are (beta ~ 0.01, which
# loses a needle within a few thousand tokens); this one shuts both, and such a layer simply stores nothing.
FILLER_HINGE_WEIGHT = 4.0


def _help(text: str, **extra) -> dict:
    return {"help": text, **extra}


# How `extend` starts the memory key's convolution (ExtendSettings.key_conv_start).
KEY_CONV_STARTS = ("keep", "previous_token")


@dataclass
class ExtendSettings:
    """What `extend` trains, on what, for how long. Every field is also a `hf-llama-mem extend` option.

    The defaults are the first stage of the shipped SmolLM2 delta's recipe: 250 steps (about 20 minutes on an idle
    2-core CPU) of passkeys alone, at 512 tokens (the needle at least W back), 2 samples a step at a constant
    learning rate, memory parameters only, centred memory keys and queries (`memory_centering`: at equal
    steps it lowered the held-out answer loss at every length measured, 1K to 4K; README, "Long context from a
    pretrained Llama"). Passkeys first, because the five-kind mix at a like budget taught the memory that a number is
    asked for, not which one. The second stage starts from that delta (`init_delta`) with another seed: passkeys,
    multi-needle and language modelling 2:1:1, the length ramped 512 -> 1536, write sparsity 3, 3e-3 cosine over 150
    steps stopped at step 75 (`stop_at`, where it did best on a held-out format), and the per-token read gate
    (`memory_token_gate`) added; the third, 24 steps of that mix at 3072 -> 4096 tokens at 1e-3. The gate is opt-in:
    in the second stage it cut the perplexity past W by a third with retrieval about level, but from a conversion at
    the first stage's 1e-2 it raised the held-out loss in the first steps.
    """

    steps: int = field(default=250, metadata=_help("optimizer steps"))
    stop_at: int | None = field(
        default=None,
        metadata=_help(
            "end the run after this step and write its delta, the schedule and length ramp staying those of --steps: "
            "an earlier point of the same run (e.g. the checkpoint that did best on a held-out format); resumes from "
            "the last checkpoint up to it"
        ),
    )
    batch_size: int = field(default=2, metadata=_help("samples per step (each weighs the same in the loss)"))
    micro_batch_size: int = field(default=1, metadata=_help("samples per forward (gradients accumulate)"))
    length_start: int = field(default=512, metadata=_help("sample length (tokens) at step 0"))
    length_end: int = field(default=512, metadata=_help("sample length at the end of the ramp"))
    length_ramp: float = field(
        default=0.0, metadata=_help("fraction of the steps over which the length rises linearly (0: always the end)")
    )
    length_multiple: int = field(default=64, metadata=_help("lengths on the ramp are multiples of this"))
    memory_lr: float = field(default=1e-2, metadata=_help("AdamW learning rate of the memory parameters"))
    gate_lr: float | None = field(
        default=None,
        metadata=_help("learning rate of the memory gates (default: memory_lr); they start closed after a conversion"),
    )
    write_lr: float | None = field(
        default=None,
        metadata=_help(
            "learning rate of the write-strength projection (default: memory_lr): AdamW moves each weight by about "
            "its learning rate per step, and a needle's writes must grow apart from the filler's"
        ),
    )
    warmup_steps: int = field(default=10, metadata=_help("linear warm-up steps of every learning rate"))
    lr_schedule: str = field(
        default="constant", metadata=_help("after the warm-up: constant or cosine", choices=("constant", "cosine"))
    )
    max_grad_norm: float = field(default=1.0, metadata=_help("gradient clipping (0: none)"))
    train_memory: bool = field(default=True, metadata=_help("train the memory parameters"))
    lora_rank: int = field(default=0, metadata=_help("LoRA rank on the attention projections (0: no LoRA)"))
    lora_alpha: float = field(default=16.0, metadata=_help("LoRA alpha (the update is scaled by alpha / rank)"))
    lora_targets: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj"], metadata=_help("LoRA target modules")
    )
    lora_lr: float = field(default=5e-4, metadata=_help("AdamW learning rate of the LoRA factors"))
    lora_weight_decay: float = field(default=0.0, metadata=_help("weight decay of the LoRA factors"))
    seed: int = field(default=0, metadata=_help("seed of the data, LoRA init and memory init of a conversion"))
    mix: dict[str, float] = field(
        default_factory=lambda: dict(RECIPE_MIX), metadata=_help("sample kinds and weights, kind=weight,...")
    )
    chat_fraction: float = field(
        default=0.2, metadata=_help("share of retrieval samples in the tokenizer's chat template (if it has one)")
    )
    min_gap: int | None = field(
        default=None, metadata=_help("tokens between each needed statement and the question (default: W)")
    )
    digits: list[int] = field(default_factory=lambda: [4, 5, 6, 7], metadata=_help("lengths of the numbers"))
    answer_end: bool = field(
        default=False,
        metadata=_help(
            "label what ends an answer too (a period; in the chat template, the end of the turn), so that a reply "
            "stops after the number instead of running on in digits"
        ),
    )
    word_answers: float = field(
        default=0.0, metadata=_help("share of passkey samples whose fact has a name, not a number, for an answer")
    )
    checkpoint_every: int = field(default=25, metadata=_help("steps between checkpoints"))
    keep_checkpoints: int = field(default=2, metadata=_help("checkpoints kept (older ones are deleted)"))
    eval_every: int = field(default=0, metadata=_help("steps between losses on held-out samples (0: none)"))
    eval_samples: int = field(default=8, metadata=_help("held-out samples (of length_end tokens) per evaluation"))
    sliding_window: int | None = field(
        default=None, metadata=_help(f"W when converting SRC (default {DEFAULT_WINDOW}); a LlamaMem SRC keeps its own")
    )
    memory_layers: list[int] | None = field(
        default=None, metadata=_help("layers with memory when converting (default all; '' for none: the twin)")
    )
    memory_rule: str | None = field(
        default=None,
        metadata=_help(
            f"memory rule when converting (default {DEFAULT_CONVERSION['memory_rule']})",
            choices=("gated_delta", "delta"),
        ),
    )
    memory_projection_rank: int | None = field(
        default=None,
        metadata=_help(
            "when converting SRC: rank of the memory's own query and key corrections (0: the attention's q and k; "
            f"default {DEFAULT_CONVERSION['memory_projection_rank']})"
        ),
    )
    memory_centering: bool | None = field(
        default=None,
        metadata=_help(
            "when converting SRC: centred memory keys and queries (learned offsets, set at the start to minus their "
            f"means on training text; default {DEFAULT_CONVERSION['memory_centering']})"
        ),
    )
    memory_token_gate: bool | None = field(
        default=None,
        metadata=_help(
            "when converting SRC, or to add one to an --init-delta without it: a per-token term of the memory's read "
            "gate, a linear function of the hidden state starting at zero; "
            f"default {DEFAULT_CONVERSION['memory_token_gate']})"
        ),
    )
    memory_write_surprisal_threshold: float | None = field(
        default=None,
        metadata=_help(
            "train (and record in the delta, for the model it converts to) writes gated by surprisal: a token writes "
            "only if the windowed model's surprisal of it exceeds this many nats (default: an --init-delta's, else "
            "none)"
        ),
    )
    write_bias_init: float | None = field(
        default=None,
        metadata=_help(
            "when converting SRC: the memory's write-strength bias (sigmoid(b) is the first write strength; "
            f"default {DEFAULT_WRITE_BIAS})"
        ),
    )
    write_bias_shift: float = field(
        default=0.0,
        metadata=_help(
            "added to every memory write-strength bias after --init-delta is applied: a delta-rule write erases what "
            "is stored along its key, so a needle outlives about head_dim / beta filler writes, and a first stage "
            "trained on short samples writes its filler too strongly for longer ones (e.g. -2)"
        ),
    )
    write_sparsity: float = field(
        default=0.0,
        metadata=_help(
            "weight of the mean write strength (beta over every write, every memory layer) added to the loss: a "
            "memory trained on short samples never pays for filler it writes, which overwrites the needle far past "
            "the trained length"
        ),
    )
    write_supervision: float = field(
        default=0.0,
        metadata=_help(
            "weight of a hinge loss on the write-strength logits, from the samples' own statement masks: every "
            f"memory layer's write logit pushed to >= {STATEMENT_WRITE_LOGIT:g} on the tokens of what a question may "
            f"depend on (needles and distractors, records, assignments, a chat's facts) and to <= "
            f"{FILLER_WRITE_LOGIT:g} on the rest (haystack, language modelling). The answer loss alone lowers every "
            "write together: the needle's and the filler's strengths stayed within 1.3-1.7x of each other, where a "
            "needle kept for 8K tokens needs them hundreds of times apart"
        ),
    )
    key_conv_start: str = field(
        default="keep",
        metadata=_help(
            "the memory key's convolution at the start (after --init-delta): keep it, or previous_token: every "
            "channel's taps zero but the one on the token before, so a token's memory key is its predecessor's "
            "key (the induction circuit: a read at token A finds what followed A) and, with the delta rule, a later "
            "write after the same token replaces the earlier one; the centring offsets are then recalibrated",
            choices=KEY_CONV_STARTS,
        ),
    )
    init_delta: str | None = field(
        default=None,
        metadata=_help(
            "start from this delta (one extend wrote, without LoRA) applied to the conversion: a second stage, e.g. "
            "a lower learning rate annealed (give it another seed, or it sees the first stage's samples again); SRC "
            "is converted as that delta's source was (W, layers, rule, rank, centring) where these settings are unset"
        ),
    )
    gradient_checkpointing: bool = field(default=False, metadata=_help("recompute activations in the backward"))
    save_model: bool = field(default=False, metadata=_help("also save the full trained model (DST/model)"))
    progress: bool = field(default=True, metadata=_help("show a progress bar"))
    name: str | None = field(default=None, metadata=_help("the source's name in the delta (default: from SRC)"))

    def __post_init__(self):
        positive = ("steps", "batch_size", "micro_batch_size", "length_start", "length_multiple", "checkpoint_every")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}.")
        if self.length_end < self.length_start:
            raise ValueError(f"length_end ({self.length_end}) must be >= length_start ({self.length_start}).")
        if self.stop_at is not None and not 1 <= self.stop_at <= self.steps:
            raise ValueError(f"stop_at must be between 1 and steps ({self.steps}), got {self.stop_at}.")
        if not 0.0 <= self.length_ramp <= 1.0:
            raise ValueError(f"length_ramp must be in [0, 1], got {self.length_ramp}.")
        for name in (
            "warmup_steps", "lora_rank", "eval_every", "keep_checkpoints", "eval_samples", "write_sparsity",
            "write_supervision",
        ):  # fmt: skip
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):  # a NaN weight would make every gradient NaN
                raise ValueError(f"{name} must be a finite number >= 0, got {value}.")
        for name in ("memory_lr", "gate_lr", "write_lr", "lora_lr", "memory_write_surprisal_threshold"):
            value = getattr(self, name)
            if value is not None and not (math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be a finite number >= 0, got {value}.")
        if not math.isfinite(self.write_bias_shift):
            raise ValueError(f"write_bias_shift must be a finite number, got {self.write_bias_shift}.")
        if self.key_conv_start not in KEY_CONV_STARTS:
            raise ValueError(f"key_conv_start must be one of {KEY_CONV_STARTS}, got {self.key_conv_start!r}.")
        if self.lr_schedule not in ("constant", "cosine"):
            raise ValueError(f"lr_schedule must be 'constant' or 'cosine', got {self.lr_schedule!r}.")
        if self.lora_rank and not self.lora_targets:
            raise ValueError("lora_rank > 0 needs at least one LoRA target module.")
        for name in ("chat_fraction", "word_answers"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}.")
        Mix(dict(self.mix))  # checks the kinds and weights

    def to_json(self) -> dict:
        return json.loads(json.dumps(asdict(self)))

    @property
    def last_step(self) -> int:
        """The step the run ends after: stop_at, or the last of the schedule."""
        return self.steps if self.stop_at is None else self.stop_at

    @property
    def ramp_steps(self) -> int:
        return round(self.steps * self.length_ramp)


# --- loading and preparing the model ----------------------------------------------------------------------------


def load_tokenizer(src):
    """The tokenizer of SRC (a model, model folder, hub id, .gguf file or "smollm2"); ValueError if it has none."""
    from .convert_llama import load_source_tokenizer

    tokenizer = load_source_tokenizer(src)
    if tokenizer is None:
        raise ValueError(f"{src!r} has no tokenizer: pass one to extend(..., tokenizer=...).")
    return tokenizer


def is_llama_mem_folder(src) -> bool:
    path = Path(str(src))
    if not (path.is_dir() and (path / "config.json").is_file()):
        return False
    return json.loads((path / "config.json").read_text()).get("model_type") == "llama_mem"


def load_model(src, settings: ExtendSettings) -> PreTrainedModel:
    """SRC as a float32 LlamaMemForCausalLM: loaded if it is one, else converted with the settings' W and layers."""
    from . import LlamaMemForCausalLM

    # A later stage converts as the stage whose delta it starts from did, unless the settings say otherwise.
    inherited = delta_conversion(settings.init_delta) if settings.init_delta is not None else {}
    defaults = {
        "sliding_window": DEFAULT_WINDOW,
        "memory_layers": None,
        **DEFAULT_CONVERSION,
        **{name: None for name in READ_TIME_FIELDS},
    }
    overrides = {}
    for name, default in defaults.items():
        value = getattr(settings, name)
        overrides[name] = value if value is not None else inherited.get(name, default)
    if isinstance(src, LlamaMemForCausalLM) or is_llama_mem_folder(src):
        model = src if isinstance(src, LlamaMemForCausalLM) else AutoModelForCausalLM.from_pretrained(src)
        wanted = {name: getattr(settings, name) for name in CONVERSION_FIELDS}
        if wanted["memory_layers"] is not None:
            wanted["memory_layers"] = sorted(wanted["memory_layers"])
        have = config_conversion(model.config)
        differ = [f"{k}: settings {v}, model {have[k]}" for k, v in wanted.items() if v is not None and v != have[k]]
        if differ:
            raise ValueError(f"SRC is already a LlamaMem model and differs from the settings: {'; '.join(differ)}.")
        for name in READ_TIME_FIELDS:
            if getattr(settings, name) is not None:
                setattr(model.config, name, getattr(settings, name))
    else:
        model = LlamaMemForCausalLM.from_llama(src if isinstance(src, PreTrainedModel) else str(src), **overrides)
        # A low write strength at the start keeps the memory from being overwritten by every filler token before it
        # has learned what is worth writing (a plain conversion's is sigmoid(0) = 0.5).
        bias = DEFAULT_WRITE_BIAS if settings.write_bias_init is None else settings.write_bias_init
        with torch.no_grad():
            for param in write_biases(model):
                param.fill_(bias)
    return model.float()


def start_from_delta(model: PreTrainedModel, path: str | os.PathLike) -> None:
    """Load a first stage's memory tensors. A delta with LoRA factors is refused: they would be merged into the
    projections, and the second stage's delta (its own factors only) would no longer hold everything trained."""
    if read_delta_metadata(path).get("lora"):
        raise ValueError(
            f"init_delta {path} has LoRA factors; a second stage can start only from a memory-only delta."
        )
    apply_delta(model, path)


WRITE_STRENGTH_SUFFIXES = (".memory.write_proj.weight", ".memory.write_proj.bias")


def write_biases(model: nn.Module) -> list[nn.Parameter]:
    """The write-strength bias of every memory layer."""
    return [param for name, param in model.named_parameters() if name.endswith(".memory.write_proj.bias")]


@torch.no_grad()
def shift_write_bias(model: nn.Module, shift: float) -> None:
    """Add `shift` to the write-strength bias of every memory layer (a resumed run then loads its checkpoint's)."""
    for param in write_biases(model):
        param.add_(shift)


@torch.no_grad()
def start_key_conv_at_previous_token(model: nn.Module) -> None:
    """Set every memory layer's key convolution to pass on the previous token's key alone (the tap before the
    token's own; `KeyConvolution` pads the taps in front), and zero the centring offsets, which were fitted to the
    keys of the convolution replaced, so that `extend` recalibrates them."""
    for memory in (m for m in model.modules() if isinstance(m, LlamaMemMemory)):
        taps = memory.key_conv.kernel_size[0]
        if taps < 2:
            raise ValueError(f"key_conv_start='previous_token' needs memory_conv_size >= 2, got {taps}.")
        memory.key_conv.weight.zero_()
        memory.key_conv.weight[:, :, taps - 2] = 1.0
        if memory.key_offset is not None:
            memory.key_offset.zero_()
            memory.query_offset.zero_()


@torch.no_grad()
def calibrate_centering(model: PreTrainedModel, input_ids: torch.LongTensor) -> None:
    """Set each memory layer's key and query offsets (`LlamaMemConfig.memory_centering`) to minus the mean of its
    memory keys (after the convolution, before the L2 normalisation) and of its queries over `input_ids` [1, T], so
    that on such text they are centred. One forward with the offsets at zero; a layer's statistics include what the
    memories before it read, as they were before this call (nothing, after a conversion: the gates are closed)."""
    sums, handles = {}, []

    def record_key(memory):
        def hook(conv, args, output):  # the key convolution's output [B, Hkv D, T']: before offset and norm
            sums[(memory, "key")] = output.float().mean(dim=(0, 2)).view_as(memory.key_offset)

        return hook

    def record_query(memory, args, output):
        if args[0] == "read":
            hidden_states, query = args[1], args[2]  # the read's query [B, H, T, D], before its correction
            if memory.query_correction is not None:
                query = query + memory.query_correction(hidden_states)
            sums[(memory, "query")] = query.float().mean(dim=(0, 2))

    memories = [m for m in model.modules() if getattr(m, "key_offset", None) is not None]
    if not memories:
        raise ValueError("calibrate_centering needs a model with memory_centering=True.")
    for memory in memories:
        memory.key_offset.zero_()
        memory.query_offset.zero_()
        handles.append(memory.register_forward_hook(record_query))
        handles.append(memory.key_conv.register_forward_hook(record_key(memory)))
    was_training = model.training
    model.eval()
    try:
        model(input_ids=input_ids.to(model.device), use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    for memory in memories:
        memory.key_offset.copy_(-sums[(memory, "key")])
        memory.query_offset.copy_(-sums[(memory, "query")])


def source_identity(model: PreTrainedModel, src, settings: ExtendSettings) -> dict:
    """A name, the config fields a delta depends on, and a fingerprint of the source weights."""
    if settings.name:
        name = settings.name
    elif isinstance(src, PreTrainedModel):
        name = src.config.name_or_path or type(src).__name__
    else:
        from .convert_llama import resolve_source_name

        name = Path(resolve_source_name(src)).name or str(src)
    config = model.config
    fields = {k: getattr(config, k, None) for k in SOURCE_FIELDS}
    fields["rope_parameters"] = getattr(config, "rope_parameters", None)
    fields["tie_word_embeddings"] = getattr(config, "tie_word_embeddings", None)
    return {"name": name, "config": json.loads(json.dumps(fields, default=str)), "fingerprint": fingerprint(model)}


def fingerprint(model: PreTrainedModel) -> str:
    """sha256 over a few source tensors (embedding rows, the first layer's attention projections), not the memory."""
    digest = hashlib.sha256()
    state = model.state_dict()
    names = ["model.embed_tokens.weight"] + [f"model.layers.0.self_attn.{p}.weight" for p in ("q_proj", "k_proj")]
    for name in names:
        if name in state:
            tensor = state[name].detach().float().cpu()
            digest.update(tensor.reshape(-1)[: 1 << 16].numpy().tobytes())
    return digest.hexdigest()[:16]


def canonical_name(name: str) -> str:
    """A parameter's name without PEFT's wrapping: model.layers.0.self_attn.q_proj.lora_A.weight."""
    for prefix in ("base_model.model.",):
        if name.startswith(prefix):
            name = name[len(prefix) :]
    return name.replace(".lora_A.default.", ".lora_A.").replace(".lora_B.default.", ".lora_B.")


def prepare(model: PreTrainedModel, settings: ExtendSettings) -> nn.Module:
    """Freeze everything, then unfreeze the memory and (with a LoRA rank) add LoRA: the model to train."""
    has_memory = any(".memory." in n for n, _ in model.named_parameters())
    if not (settings.train_memory and has_memory) and not settings.lora_rank:
        why = "the model has no memory layers" if not has_memory else "train_memory is off"
        raise ValueError(f"nothing to train: {why} and lora_rank is 0. Give a LoRA rank, or train the memory.")
    model.requires_grad_(False)
    if settings.lora_rank:
        from peft import LoraConfig, get_peft_model

        lora = LoraConfig(
            r=settings.lora_rank,
            lora_alpha=settings.lora_alpha,
            target_modules=list(settings.lora_targets),
            lora_dropout=0.0,
            bias="none",
        )
        model = get_peft_model(model, lora)
    for name, param in model.named_parameters():
        param.requires_grad_((".memory." in name and settings.train_memory) or ".lora_" in name)
    if settings.gradient_checkpointing:
        base = base_causal_lm(model)
        if hasattr(base, "activation_checkpointing_enable"):  # transformers' newer name
            base.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    return model


def delta_tensors(model: nn.Module) -> dict[str, nn.Parameter]:
    """What a delta holds, by canonical name: every memory parameter (trained or not) and every LoRA factor."""
    return {
        canonical_name(n): p
        for n, p in model.named_parameters()
        if ".memory." in n or ".lora_A." in n or ".lora_B." in n
    }


def gate_values(model: nn.Module) -> torch.Tensor | None:
    gates = [p.detach().reshape(-1) for n, p in model.named_parameters() if n.endswith(".memory.gate")]
    return torch.cat(gates) if gates else None


def base_causal_lm(model: nn.Module) -> PreTrainedModel:
    return model.get_base_model() if hasattr(model, "get_base_model") else model


# --- the loss -----------------------------------------------------------------------------------------------------


def sample_losses(model: nn.Module, samples: list[dict]) -> tuple[torch.Tensor, list[bool]]:
    """Per sample: the mean cross-entropy over its labelled tokens, and whether greedy decoding gets every labelled
    token (the answer) right. The LM head runs only where a label is counted (for retrieval, the answer's few
    positions), not over every position."""
    lm = base_causal_lm(model)
    batch = as_tensors(samples)
    device = lm.device
    input_ids = batch["input_ids"].to(device)
    # Surprisal-gated writes need the LM head at every position anyway: then the model's own logits.
    gated = lm.config.memory_write_surprisal_threshold is not None
    outputs = lm(input_ids=input_ids, use_cache=False) if gated else lm.model(input_ids=input_ids, use_cache=False)
    targets = batch["labels"][:, 1:].to(device)
    losses, correct = [], []
    for i in range(len(samples)):
        positions = (targets[i] != -100).nonzero().squeeze(-1)
        logits = outputs.logits[i, positions] if gated else lm.lm_head(outputs.last_hidden_state[i, positions])
        counted = targets[i, positions]
        # The model's own causal-LM loss (row-blocked for long rows), here on rows that are already shifted.
        losses.append(lm.loss_function(logits=logits, labels=None, vocab_size=logits.shape[-1], shift_labels=counted))
        correct.append(bool((logits.argmax(-1) == counted).all()))
    return torch.stack(losses), correct


class WriteStrengths:
    """Collects, while active, the write strengths (beta) of every memory write of each training forward: a context
    manager holding forward hooks on the memory modules (their "write" step returns [value | key | g | beta])."""

    def __init__(self, model: nn.Module):
        self.model, self.means, self.handles = model, [], []

    def __enter__(self) -> "WriteStrengths":
        for module in self.model.modules():
            if isinstance(module, LlamaMemMemory):
                self.handles.append(module.register_forward_hook(self._record))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self.handles:
            handle.remove()

    def _record(self, module, args, output) -> None:
        if args[0] == "write" and output.shape[2] and torch.is_grad_enabled():  # training forwards only
            self.means.append((module, output[..., -1]))  # [B, Hkv, T']: the tokens that leave the window

    def pop(self) -> list[torch.Tensor]:
        """Every layer's write strengths [B, Hkv, T'] recorded since the last call, and forget them. A forward in
        pieces (surprisal-gated writes, through a cache) writes a layer's in several calls: they are joined, and
        then cover every token (before the gate), not only those that leave the window."""
        by_layer = {}
        for module, beta in self.means:
            by_layer.setdefault(module, []).append(beta)
        self.means = []
        return [torch.cat(pieces, dim=-1) for pieces in by_layer.values()]


def write_supervision_loss(strengths: list[torch.Tensor], samples: list[dict]) -> torch.Tensor:
    """The hinge of `ExtendSettings.write_supervision`, per sample (mean over layers and heads): FILLER_HINGE_WEIGHT
    times the mean of relu(z - FILLER_WRITE_LOGIT) over the sample's written filler tokens, plus the mean of
    relu(STATEMENT_WRITE_LOGIT - z) over its written statement tokens, z the write logit. A sample writes its
    first T' tokens (those that leave the window in a forward without a cache)."""
    written = strengths[0].shape[-1]
    mask = torch.tensor([s["statement_mask"][:written] for s in samples], device=strengths[0].device)
    # The logit from beta, clamped where sigmoid underflowed (z < -69): a 0 gradient there, not log(0)'s NaN.
    beta = torch.stack(strengths).clamp(1e-30, 1 - 1e-7)  # [layers, B, Hkv, T']
    logits = beta.log() - (-beta).log1p()
    statement = mask[None, :, None, :].to(logits.dtype).expand_as(logits)
    filler = 1 - statement
    over = torch.relu(logits - FILLER_WRITE_LOGIT) * filler
    under = torch.relu(STATEMENT_WRITE_LOGIT - logits) * statement
    per_sample = FILLER_HINGE_WEIGHT * over.sum((0, 2, 3)) / filler.sum((0, 2, 3)).clamp_min(1)
    return per_sample + under.sum((0, 2, 3)) / statement.sum((0, 2, 3)).clamp_min(1)


# --- checkpoints ------------------------------------------------------------------------------------------------


def checkpoint_dirs(output_dir: Path) -> list[Path]:
    folder = output_dir / "checkpoints"
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if p.is_dir() and p.name.startswith("step-") and p.name[5:].isdigit()]
    return sorted(found, key=checkpoint_step)


def checkpoint_step(folder: Path) -> int:
    """The step of a checkpoint folder (checkpoints/step-N)."""
    return int(folder.name[5:])


def save_checkpoint(output_dir: Path, step: int, model, optimizer, scheduler, stream, settings, keep: int) -> Path:
    folder = output_dir / "checkpoints"
    folder.mkdir(parents=True, exist_ok=True)
    final, tmp = folder / f"step-{step:06d}", folder / f"step-{step:06d}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    tensors = {n: p.detach().cpu().contiguous() for n, p in delta_tensors(model).items()}
    save_file(tensors, tmp / "trained.safetensors")
    state = {
        "step": step,
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "rng": {"torch": torch.get_rng_state(), "python": random.getstate()},
        "data": stream.state_dict(),
        "settings": json.dumps(settings.to_json()),
    }
    torch.save(state, tmp / "state.pt")
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    for old in checkpoint_dirs(output_dir)[:-keep] if keep else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def more_steps_continue_the_run(saved: dict, settings: ExtendSettings, step: int) -> bool:
    """Whether a run saved with `saved` settings, continued from `step` to `settings.steps`, is exactly the longer
    run from the start: so where neither the learning rate nor the sample length depends on the total (a constant
    schedule after the warm-up, the same length ramp), a finished run can be given more steps."""
    same_ramp = round(saved["steps"] * saved["length_ramp"]) == settings.ramp_steps
    constant = saved["lr_schedule"] == settings.lr_schedule == "constant"
    return constant and same_ramp and settings.steps >= step


def load_checkpoint(folder: Path, model, optimizer, scheduler, stream, settings) -> int:
    from safetensors.torch import load_file

    state = torch.load(folder / "state.pt", weights_only=True)
    saved = json.loads(state["settings"])
    current = settings.to_json()
    # A field added since the checkpoint was saved had its default value in that run.
    saved = {**ExtendSettings().to_json(), **saved}
    resumable = set(RESUMABLE_CHANGES)
    if more_steps_continue_the_run(saved, settings, state["step"]):
        resumable.add("steps")
    differ = [k for k in current if k not in resumable and saved[k] != current[k]]
    if differ:
        raise ValueError(
            f"The checkpoint {folder} was made with other settings ({', '.join(differ)}: "
            f"{ {k: saved[k] for k in differ} } there, { {k: current[k] for k in differ} } here); "
            "use the same settings, another output folder, or resume=False."
        )
    tensors = load_file(folder / "trained.safetensors")
    params = delta_tensors(model)
    if set(tensors) != set(params):
        raise ValueError(f"The checkpoint {folder} holds other tensors than this model trains.")
    with torch.no_grad():
        for name, param in params.items():
            param.copy_(tensors[name])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["rng"]["torch"])
    random.setstate(state["rng"]["python"])
    stream.load_state_dict(state["data"])
    return int(state["step"])


# --- the delta ----------------------------------------------------------------------------------------------------


def config_conversion(config) -> dict:
    """A LlamaMem config's CONVERSION_FIELDS, its memory layers listed (sorted) as a delta records them."""
    conversion = {name: getattr(config, name) for name in CONVERSION_FIELDS}
    if config.memory_layers is None:
        conversion["memory_layers"] = list(range(config.num_hidden_layers))
    else:
        conversion["memory_layers"] = sorted(config.memory_layers)
    return conversion


def write_delta(path: Path, model: nn.Module, metadata: dict) -> Path:
    tensors = {n: p.detach().cpu().float().contiguous() for n, p in delta_tensors(model).items()}
    return save_delta_file(path, tensors, metadata)


def save_delta_file(path: Path, tensors: dict[str, torch.Tensor], metadata: dict) -> Path:
    """Write a delta file whole or not at all (through a temporary file): a run stopped mid-write leaves the old
    one. Metadata values that are not strings are stored as JSON."""
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, tmp, metadata={k: v if isinstance(v, str) else json.dumps(v) for k, v in metadata.items()})
    os.replace(tmp, path)
    return path


def read_delta_metadata(path: str | os.PathLike) -> dict:
    """The metadata of a delta file, JSON values decoded: format, sliding_window, memory_layers, memory_rule,
    memory_conv_size, memory_projection_rank, memory_centering and memory_token_gate (absent in older deltas: 0,
    False and False), lora, source, settings, command, seed, data, training, versions, earlier_stages (a second
    stage's record of the stages before it)."""
    with safe_open(str(path), framework="pt") as f:
        raw = f.metadata() or {}
    if raw.get("format") != DELTA_FORMAT:
        raise ValueError(f"{path} is not a memory delta written by hf_llama_mem.extend (format {raw.get('format')}).")
    decoded = {}
    for key, value in raw.items():
        try:
            decoded[key] = json.loads(value)
        except json.JSONDecodeError:
            decoded[key] = value
    return decoded


# The config fields a conversion must share with the delta it takes, as `from_llama` keywords.
CONVERSION_FIELDS = (
    "sliding_window",
    "memory_rule",
    "memory_layers",
    "memory_projection_rank",
    "memory_centering",
    "memory_token_gate",
)
# Settings of how the memory is written that a delta records for the model it converts to, without tying the delta to
# them: its tensors apply whatever they are set to (no parameter depends on them).
READ_TIME_FIELDS = ("memory_write_surprisal_threshold",)
# What a delta written before a field existed was trained with.
CONVERSION_FIELDS_BEFORE = {"memory_projection_rank": 0, "memory_centering": False, "memory_token_gate": False}
# The parameters a delta trained without them applies to exactly as zeros (a later stage may add them).
ADDABLE_PARAMETERS = {"memory_token_gate": ".memory.token_gate"}


def delta_conversion(delta_path: str | os.PathLike) -> dict:
    """The `from_llama` keywords of the conversion a delta applies to (W, memory rule, memory layers, rank,
    centring, token gate) and of the writes it was trained or tuned for (READ_TIME_FIELDS; None if not recorded)."""
    meta = read_delta_metadata(delta_path)
    conversion = {name: meta.get(name, CONVERSION_FIELDS_BEFORE.get(name)) for name in CONVERSION_FIELDS}
    return {**conversion, **{name: meta.get(name) for name in READ_TIME_FIELDS}}


def apply_delta(model: PreTrainedModel, delta_path: str | os.PathLike) -> PreTrainedModel:
    """Load a delta into a LlamaMem model in place: the memory tensors, and the LoRA factors merged into their
    projections as PEFT merges them (W + B @ A * alpha / r). Raises ValueError naming every mismatch (memory layers,
    memory rule, dimensions, missing or extra tensors, shapes) before anything is changed. A model with another window
    than the delta's takes it, with a warning: no tensor depends on W. A model with a
    token gate (`memory_token_gate`) takes a delta trained without one: the gate's weights are set to zero, which
    is that delta's model exactly."""
    from safetensors.torch import load_file

    meta = read_delta_metadata(delta_path)
    tensors = load_file(str(delta_path))
    config = model.config
    problems = []
    if getattr(config, "model_type", None) != "llama_mem":
        raise ValueError(
            f"apply_delta needs a LlamaMem model, got model_type {getattr(config, 'model_type', None)!r}."
        )
    have = config_conversion(config)
    added = set()  # the suffixes of parameters the model has and the delta was trained without: they start at zero
    for name, value in delta_conversion(delta_path).items():
        if name in READ_TIME_FIELDS:
            continue
        if name == "sliding_window":
            if value != have[name]:
                # No memory parameter depends on W: the memory holds whatever has left the window, at any W.
                logger.warning(
                    f"The delta was trained with sliding_window={value}; this model reads it at {have[name]}."
                )
            continue
        if name in ADDABLE_PARAMETERS and value is False and have[name] is True:
            added.add(ADDABLE_PARAMETERS[name])
        elif value != have[name]:
            problems.append(f"{name}: delta {value!r}, model {have[name]!r}")
    for key, value in meta["source"]["config"].items():
        if key in SOURCE_FIELDS and value is not None and getattr(config, key, None) != value:
            problems.append(f"{key}: delta's source {value}, model {getattr(config, key, None)}")
    params = dict(model.named_parameters())
    memory = {n for n in params if ".memory." in n}
    lora = meta.get("lora")
    factors = {n for n in tensors if ".lora_A." in n or ".lora_B." in n}
    zeroed = {n for n in memory if n.endswith(tuple(added))}
    missing = sorted(memory - zeroed - set(tensors))
    extra = sorted(set(tensors) - memory - factors)
    if missing:
        problems.append(
            f"memory tensors of the model missing from the delta: {missing[:4]}{'...' if len(missing) > 4 else ''}"
        )
    if extra:
        problems.append(f"delta tensors the model does not have: {extra[:4]}{'...' if len(extra) > 4 else ''}")
    for name in sorted(memory & set(tensors)):
        if tuple(tensors[name].shape) != tuple(params[name].shape):
            problems.append(f"{name}: delta shape {tuple(tensors[name].shape)}, model {tuple(params[name].shape)}")
    merges = []
    for name in sorted(n for n in factors if ".lora_A." in n):
        target = name.replace(".lora_A.weight", ".weight")
        b_name = name.replace(".lora_A.", ".lora_B.")
        a, b = tensors[name], tensors.get(b_name)
        if target not in params or b is None:
            problems.append(f"LoRA factor {name}: the model has no {target}, or the delta no {b_name}")
            continue
        out_features, in_features = params[target].shape
        if a.shape[1] != in_features or b.shape[0] != out_features or a.shape[0] != b.shape[1]:
            problems.append(
                f"{name}: A {tuple(a.shape)} and B {tuple(b.shape)} do not fit {target} {tuple(params[target].shape)}"
            )
        merges.append((target, a, b))
    if factors and not lora:
        problems.append("the delta holds LoRA factors but its metadata records no LoRA settings")
    if problems:
        raise ValueError(f"The delta {delta_path} does not fit this model: " + "; ".join(problems) + ".")
    trained_on = meta["source"].get("fingerprint")
    if trained_on and trained_on != fingerprint(model):
        # Same shapes, other weights (another quantization or checkpoint of the source, or a model that already
        # carries a delta): the delta applies, but it was trained for the weights it was trained on.
        logger.warning(
            f"The delta was trained on {meta['source'].get('name')!r} (weights fingerprint {trained_on}); this "
            f"model's weights differ (fingerprint {fingerprint(model)}), so its results may differ from the recorded."
        )
    with torch.no_grad():
        for name in memory:
            if name in zeroed:
                params[name].zero_()
            else:
                params[name].copy_(tensors[name])
        if merges:
            scaling = lora["alpha"] / lora["rank"]
            for target, a, b in merges:
                weight = params[target]
                weight.data += (b.to(weight.dtype) @ a.to(weight.dtype)) * scaling
    return model


# --- the run ------------------------------------------------------------------------------------------------------


def split_group(model: nn.Module, groups: list[dict], suffixes: tuple[str, ...], name: str, lr: float) -> list[dict]:
    """The memory parameters whose names end with one of `suffixes` moved into a group of their own, `name`, with
    learning rate `lr`."""
    chosen = {id(p) for n, p in model.named_parameters() if n.endswith(suffixes) and p.requires_grad}
    split = []
    for group in groups:
        kept = [p for p in group["params"] if id(p) not in chosen]
        if group["name"] == "memory":
            moved = [p for p in group["params"] if id(p) in chosen]
            split.append({**group, "params": moved, "name": name, "lr": lr})
        if kept:
            split.append({**group, "params": kept})
    return [group for group in split if group["params"]]


def make_scheduler(optimizer, settings: ExtendSettings):
    warmup, total = settings.warmup_steps, settings.steps

    def factor(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        if settings.lr_schedule == "cosine":
            progress = (step - warmup) / max(1, total - warmup)
            return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
        return 1.0

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def plot_log(log_path: Path, png_path: Path) -> None:
    """Two panels by step: the loss (each step; running means of the retrieval and the language-modelling losses;
    the held-out loss) and the mean |gate|."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    records = [json.loads(line) for line in log_path.read_text().splitlines() if line.strip()]
    train = [r for r in records if "loss" in r]
    evals = [r for r in records if "eval_loss" in r]
    if not train:
        return
    figure = Figure(figsize=(8, 6), dpi=100)
    FigureCanvasAgg(figure)
    top, bottom = figure.subplots(2, 1, sharex=True)
    steps = [r["step"] for r in train]
    top.plot(steps, [r["loss"] for r in train], color="tab:gray", alpha=0.3, label="loss (step)")
    window = max(1, len(train) // 20)
    for label, color, value in (
        ("retrieval", "tab:blue", lambda r: _mean([v for k, v in r["loss_by_kind"].items() if k in RETRIEVAL_KINDS])),
        ("language modelling", "tab:orange", lambda r: r["loss_by_kind"].get("language_modelling")),
    ):
        points = [(r["step"], value(r)) for r in train if value(r) is not None]
        if points:
            xs, ys = zip(*points, strict=True)
            running = [_mean(ys[max(0, i - window + 1) : i + 1]) for i in range(len(ys))]
            top.plot(xs, running, color=color, label=f"{label} (mean of {window} steps)")
    if evals:
        top.plot([r["step"] for r in evals], [r["eval_loss"] for r in evals], "o-", color="tab:red", label="held-out")
    top.set_ylabel("loss")
    top.set_yscale("log")
    top.legend(loc="upper right")
    gates = [(r["step"], r["mean_abs_gate"]) for r in train if r.get("mean_abs_gate") is not None]
    if gates:
        bottom.plot(*zip(*gates, strict=True), color="tab:green")
    bottom.set_ylabel("mean |gate|")
    bottom.set_xlabel("step")
    figure.tight_layout()
    figure.savefig(png_path)


def _truncate_log(log_path: Path, step: int) -> None:
    if not log_path.exists():
        return
    kept = [line for line in log_path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
    log_path.write_text("".join(line + "\n" for line in kept))


def versions() -> dict:
    import transformers

    found = {"torch": torch.__version__, "transformers": transformers.__version__}
    for package in ("hf-llama-mem", "peft"):
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            found[package] = None
    return found


def extend(
    src,
    output_dir: str | os.PathLike,
    settings: ExtendSettings | None = None,
    resume: bool = True,
    tokenizer=None,
    command: str | None = None,
    on_step: Callable[[dict], None] | None = None,
) -> Path:
    """Train a long-context delta for SRC and return the path of `output_dir/memory_delta.safetensors`.

    Args:
        src: a LlamaMem folder or model, or a Llama-family folder, hub id, .gguf file or model (converted with the
            settings' sliding_window, memory_layers and memory_rule).
        output_dir: where checkpoints, log.jsonl, loss_gate.png, settings.json and the delta go.
        settings: `ExtendSettings` (defaults if None).
        resume: continue from the latest checkpoint in output_dir (its settings must match); False starts over,
            deleting earlier checkpoints and the log.
        tokenizer: the tokenizer for the samples (default: SRC's own).
        command: the command line recorded in the delta (default: this process's).
        on_step: called after every step with that step's log record (e.g. to stop early by raising).
    """
    settings = settings or ExtendSettings()
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    command = command or shlex.join([Path(sys.argv[0]).name, *sys.argv[1:]])
    torch.manual_seed(settings.seed)
    random.seed(settings.seed)

    model = load_model(src, settings)
    source = source_identity(model, src, settings)
    if settings.init_delta is not None:
        start_from_delta(model, settings.init_delta)
    shift_write_bias(model, settings.write_bias_shift)
    if settings.key_conv_start == "previous_token":  # a resumed run then loads its checkpoint's
        start_key_conv_at_previous_token(model)
    if tokenizer is None:
        tokenizer = load_tokenizer(src)
    config = model.config
    torch.manual_seed(sample_seed(settings.seed, "lora"))
    model = prepare(model, settings)
    trained = [p for p in model.parameters() if p.requires_grad]

    min_gap = config.sliding_window if settings.min_gap is None else settings.min_gap
    data = LongContextData(
        tokenizer,
        NaturalText.for_split(tokenizer, "train"),
        min_gap=min_gap,
        digits=tuple(settings.digits),
        chat_fraction=settings.chat_fraction,
        answer_end=settings.answer_end,
        word_answers=settings.word_answers,
    )
    curriculum = LengthCurriculum(
        settings.length_start, settings.length_end, settings.ramp_steps, settings.length_multiple
    )
    stream = LongContextStream(data, Mix(dict(settings.mix)), curriculum, settings.batch_size, settings.seed)
    for kind in Mix(dict(settings.mix)).kinds:  # a length too short for a kind fails now, not mid-run
        data.generate(kind, settings.length_start, random.Random(sample_seed(settings.seed, "check", kind)))
    largest = max(max(s["input_ids"]) for s in stream.batch(0))
    if largest >= config.vocab_size:
        raise ValueError(
            f"The tokenizer gives ids up to {largest}, beyond the model's vocabulary {config.vocab_size}."
        )

    groups = memory_parameter_groups(model, settings.lora_lr, settings.lora_weight_decay, settings.memory_lr)
    # A gate opens by its learning rate per step (AdamW), and a closed gate also scales every other memory
    # parameter's gradient, so a faster gate speeds up all the memory's learning.
    if settings.gate_lr is not None:
        groups = split_group(model, groups, (".memory.gate",), "memory_gate", settings.gate_lr)
    if settings.write_lr is not None:
        groups = split_group(model, groups, WRITE_STRENGTH_SUFFIXES, "memory_write", settings.write_lr)
    optimizer = torch.optim.AdamW(groups)
    scheduler = make_scheduler(optimizer, settings)

    log_path = output_dir / "log.jsonl"
    start = 0
    checkpoints = checkpoint_dirs(output_dir)
    later = [c.name for c in checkpoints if settings.stop_at and checkpoint_step(c) > settings.stop_at]
    if resume and later:
        raise ValueError(
            f"{output_dir} holds checkpoints past stop_at={settings.stop_at} ({', '.join(later)}), which this run "
            "would discard: run it in a new folder holding a copy of the checkpoint to stop at (checkpoints/step-N)."
        )
    if resume and checkpoints:
        start = load_checkpoint(checkpoints[-1], model, optimizer, scheduler, stream, settings)
        _truncate_log(log_path, start)
        logger.info(f"Resumed from {checkpoints[-1]} (step {start} of {settings.steps}).")
    else:
        shutil.rmtree(output_dir / "checkpoints", ignore_errors=True)
        log_path.unlink(missing_ok=True)
    # After the resume: a checkpoint holds the offsets, so a resumed run skips this forward.
    offsets = [p for n, p in model.named_parameters() if n.endswith((".memory.key_offset", ".memory.query_offset"))]
    if offsets and not any(offset.any() for offset in offsets):  # not set yet: a conversion or an old delta
        rng = random.Random(sample_seed(settings.seed, "centering"))
        text = data.generate("language_modelling", CENTERING_TOKENS + config.sliding_window, rng)
        calibrate_centering(base_causal_lm(model), torch.tensor([text["input_ids"]]))
    (output_dir / "settings.json").write_text(json.dumps(settings.to_json(), indent=2) + "\n")

    eval_samples = None
    if settings.eval_every:
        eval_data = LongContextData(
            tokenizer, NaturalText.for_split(tokenizer, "eval"), min_gap=min_gap, digits=tuple(settings.digits),
            chat_fraction=settings.chat_fraction, answer_end=settings.answer_end, word_answers=settings.word_answers,
        )  # fmt: skip
        eval_mix = Mix(dict(settings.mix))
        eval_samples = []
        for i in range(settings.eval_samples):
            rng = random.Random(sample_seed(settings.seed, "eval", i))
            eval_samples.append(eval_data.generate(eval_mix.choose(rng), settings.length_end, rng))

    def evaluate(step: int) -> None:
        model.eval()
        with torch.no_grad():
            losses, correct = [], []
            for i in range(0, len(eval_samples), settings.micro_batch_size):
                part_losses, part_correct = sample_losses(model, eval_samples[i : i + settings.micro_batch_size])
                losses += part_losses.tolist()
                correct += part_correct
        model.train()
        retrieval = [c for c, s in zip(correct, eval_samples, strict=True) if s["kind"] in RETRIEVAL_KINDS]
        record = {
            "step": step,
            "eval_loss": sum(losses) / len(losses),
            "eval_loss_by_kind": _by_kind(losses, eval_samples),
            "eval_answer_accuracy": sum(retrieval) / len(retrieval) if retrieval else None,
        }
        with log_path.open("a") as f:
            f.write(json.dumps(record) + "\n")

    if eval_samples and start == 0:
        evaluate(0)
    bar = tqdm(
        total=settings.last_step, initial=start, desc="extend", disable=not settings.progress, dynamic_ncols=True
    )
    with WriteStrengths(model) as meter:
        for step in range(start, settings.last_step):
            began = time.perf_counter()
            samples = stream.batch(step)
            stream.next_step = step + 1
            losses, write_strengths, write_hinges = [], [], []
            for i in range(0, len(samples), settings.micro_batch_size):
                micro = samples[i : i + settings.micro_batch_size]
                part, _ = sample_losses(model, micro)
                loss = part.sum() / len(samples)
                strengths = meter.pop()
                if strengths:
                    write_strength = torch.stack([s.mean() for s in strengths]).mean()
                    write_strengths.append(write_strength.item())
                    if settings.write_sparsity:
                        loss = loss + settings.write_sparsity * write_strength * len(part) / len(samples)
                    hinge = write_supervision_loss(strengths, micro)
                    write_hinges += hinge.detach().tolist()
                    if settings.write_supervision:
                        loss = loss + settings.write_supervision * hinge.sum() / len(samples)
                loss.backward()
                meter.pop()  # a recomputing backward (gradient checkpointing) runs the hooks again: not counted
                losses += part.detach().tolist()
            grad_norm = None
            if settings.max_grad_norm > 0:
                grad_norm = float(torch.nn.utils.clip_grad_norm_(trained, settings.max_grad_norm))
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            gates = gate_values(model)
            record = {
                "step": step + 1,
                "loss": sum(losses) / len(losses),
                "loss_by_kind": _by_kind(losses, samples),
                "mean_abs_gate": None if gates is None else gates.abs().mean().item(),
                "mean_write_strength": _mean(write_strengths),
                "write_hinge": _mean(write_hinges),
                "max_abs_gate": None if gates is None else gates.abs().max().item(),
                "grad_norm": grad_norm,
                "lr": {g["name"]: g["lr"] for g in optimizer.param_groups},
                "length": len(samples[0]["input_ids"]),
                "seconds": time.perf_counter() - began,
            }
            with log_path.open("a") as f:
                f.write(json.dumps(record) + "\n")
            done = step + 1
            if done % settings.checkpoint_every == 0 or done == settings.last_step:
                save_checkpoint(
                    output_dir, done, model, optimizer, scheduler, stream, settings, settings.keep_checkpoints
                )
                plot_log(log_path, output_dir / "loss_gate.png")
            if eval_samples and (done % settings.eval_every == 0 or done == settings.last_step):
                evaluate(done)
            bar.update(1)
            bar.set_postfix(
                loss=f"{record['loss']:.3f}", gate=f"{record['mean_abs_gate'] or 0:.3f}", len=record["length"]
            )
            if on_step is not None:
                on_step(record)
    bar.close()
    plot_log(log_path, output_dir / "loss_gate.png")

    records = [json.loads(line) for line in log_path.read_text().splitlines() if line.strip()]
    train_records = [r for r in records if "loss" in r]
    gates = gate_values(model)
    base_config = base_causal_lm(model).config
    metadata = {
        "format": DELTA_FORMAT,
        "format_version": DELTA_FORMAT_VERSION,
        **config_conversion(base_config),
        **{name: getattr(base_config, name) for name in READ_TIME_FIELDS},
        "memory_conv_size": base_config.memory_conv_size,
        "lora": (
            {
                "rank": settings.lora_rank,
                "alpha": settings.lora_alpha,
                "target_modules": list(settings.lora_targets),
                "merged_on_apply": True,
            }
            if settings.lora_rank
            else None
        ),
        "source": source,
        "settings": settings.to_json(),
        "command": command,
        "seed": settings.seed,
        "data": {
            **data.describe(),
            "text_split": "train",
            "mix": dict(settings.mix),
            "lengths": {"start": settings.length_start, "end": settings.length_end, "ramp_steps": settings.ramp_steps},
            "batch_size": settings.batch_size,
            "samples_seen": settings.last_step * settings.batch_size,
        },
        "training": {
            "steps": settings.last_step,
            "schedule_steps": settings.steps,
            "trained_parameters": sum(p.numel() for p in trained),
            "final_loss": sum(r["loss"] for r in train_records[-10:]) / max(1, len(train_records[-10:])),
            "mean_abs_gate": None if gates is None else gates.abs().mean().item(),
            "seconds": sum(r["seconds"] for r in train_records),
        },
        "versions": versions(),
        "earlier_stages": earlier_stages(settings.init_delta),
    }
    delta_path = write_delta(output_dir / DELTA_FILE, model, metadata)
    if settings.save_model:
        save_full_model(model, delta_path, tokenizer, output_dir / "model")
    return delta_path


def earlier_stages(init_delta: str | None) -> list[dict]:
    """What produced the delta a second stage started from (and what produced that one's start), oldest first: each
    stage's command, settings, seed, data and training record, so a multi-stage delta says how to make it again."""
    if init_delta is None:
        return []
    meta = read_delta_metadata(init_delta)
    stage = {key: meta.get(key) for key in ("command", "settings", "seed", "data", "training", "versions")}
    return [*meta.get("earlier_stages", []), stage]


def save_full_model(model: nn.Module, delta_path: Path, tokenizer, folder: Path) -> None:
    """The trained model as a full folder (LoRA merged by apply_delta into an unwrapped copy) with its tokenizer."""
    base = model.unload() if hasattr(model, "unload") else model  # PEFT: the base model without the LoRA layers
    apply_delta(base, delta_path)
    base.eval().save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def _mean(values) -> float | None:
    values = list(values)
    return sum(values) / len(values) if values else None


def _by_kind(losses: list[float], samples: list[dict]) -> dict[str, float]:
    by_kind: dict[str, list[float]] = {}
    for loss, sample in zip(losses, samples, strict=True):
        by_kind.setdefault(sample["kind"], []).append(loss)
    return {k: sum(v) / len(v) for k, v in by_kind.items() if k in KINDS}


# --- the command line -----------------------------------------------------------------------------------------------


def _parse_int_list(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def _parse_str_list(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def _parse_mix(text: str) -> dict[str, float]:
    weights = {}
    for item in _parse_str_list(text):
        kind, sep, weight = item.partition("=")
        if not sep:
            raise argparse.ArgumentTypeError(f"mix entries are kind=weight, got {item!r}")
        weights[kind.strip()] = float(weight)
    try:
        Mix(weights)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    return weights


def add_extend_parser(commands) -> None:
    """Add `extend SRC DST [options]` to a subparsers object; every ExtendSettings field is an option."""
    p = commands.add_parser(
        "extend",
        help="long-context fine-tuning: train the memory (and optionally LoRA) of a converted model, write a delta",
        description=__doc__.split("\n\n")[0],
    )
    p.add_argument("src", help="LlamaMem folder, or a Llama-family folder, hub id or .gguf file to convert")
    p.add_argument("dst", help="output folder (checkpoints, log.jsonl, loss_gate.png, memory_delta.safetensors)")
    p.add_argument("--no-resume", dest="resume", action="store_false", help="start over even if checkpoints exist")
    defaults = ExtendSettings()
    for f in dataclasses.fields(ExtendSettings):
        option = "--" + f.name.replace("_", "-")
        default = getattr(defaults, f.name)
        kwargs = {"dest": f.name, "help": f.metadata.get("help", ""), "default": default}
        if "choices" in f.metadata:
            kwargs["choices"] = f.metadata["choices"]
        kinds = f.type.__args__ if isinstance(f.type, types.UnionType) else (f.type,)
        if bool in kinds or f.type == "bool":
            kwargs["action"] = argparse.BooleanOptionalAction
        elif f.name == "mix":
            kwargs["type"], kwargs["default"] = _parse_mix, ",".join(f"{k}={v}" for k, v in default.items())
        elif f.name in ("lora_targets",):
            kwargs["type"], kwargs["default"] = _parse_str_list, ",".join(default)
        elif f.name in ("digits", "memory_layers"):
            kwargs["type"] = _parse_int_list
            kwargs["default"] = None if default is None else ",".join(map(str, default))
        else:
            kwargs["type"] = next(t for t in kinds if t is not type(None))
        p.add_argument(option, **kwargs)
    p.set_defaults(run=run_extend_command)


def run_extend_command(args: argparse.Namespace) -> None:
    # argparse parses string defaults with the option's type, so every value here is already typed.
    settings = ExtendSettings(**{f.name: getattr(args, f.name) for f in dataclasses.fields(ExtendSettings)})
    command = shlex.join(["hf-llama-mem", *sys.argv[1:]]) if sys.argv[1:2] == ["extend"] else None
    delta = extend(args.src, args.dst, settings, resume=args.resume, command=command)
    meta = read_delta_metadata(delta)
    # The console command's result, on stdout like every subcommand's.
    sys.stdout.write(json.dumps({"delta": str(delta), **meta["training"]}, indent=2) + "\n")
