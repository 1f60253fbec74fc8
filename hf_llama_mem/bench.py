"""`hf-llama-mem bench` (also benchmarks/bench_vs_llama.py): LlamaMem vs transformers' LlamaForCausalLM.

Both models have identical dimensions and run in one process, fp32 on the CPU. Reported, each as a ratio
LlamaMem / Llama: training tokens/s, prefill tokens/s, decode ms/token, cache size and the peak extra memory of each
prefill; plus LlamaMem's own decode at the longest context over its decode at the shortest, and the training MFU
against a matmul peak measured on the same machine. Writes JSON and a markdown table.

LlamaMem computes its training loss without full-size log-probabilities (causal_lm_loss.py), which is faster on its
own; so training is also measured against a Llama given that same loss, the ratio the architecture alone earns.

With `compile`, training and decode are measured a second time with both models under torch.compile (inductor), like
with like: each decode on a StaticCache, transformers' cache for a compiled decode step (LlamaMem's holds W - 1 slots
whatever the length, Llama's every token). The first step of each shape compiles, untimed.

With `surprisal_threshold` in the settings, LlamaMem's writes are gated by surprisal (surprisal_writes.py), as the
shipped SmolLM2 delta's are: every training step, prefill and decode step then also runs the windowed pass, and the
ratios are what the gate costs against Llama.
"""

import contextlib
import ctypes
import json
import os
import statistics
import threading
import time
from collections.abc import Callable

import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM, StaticCache

from .causal_lm_loss import causal_lm_loss
from .configuration_llama_mem import LlamaMemConfig
from .modeling_llama_mem import CACHE_FIELD, LlamaMemForCausalLM

FULL = dict(
    train=[2048, 8192],
    train_repeats=3,
    prefill=[16384, 32768],
    prefill_repeats=2,
    decode=[1024, 4096, 16384, 32768],
    window=1024,
    dims=dict(
        hidden_size=512,
        num_hidden_layers=8,
        num_attention_heads=8,
        num_key_value_heads=2,
        intermediate_size=1408,
        vocab_size=32000,
    ),
)
QUICK = dict(
    train=[1024, 4096],
    train_repeats=2,
    prefill=[8192],
    prefill_repeats=1,
    decode=[512, 8192],
    window=256,
    dims=dict(
        hidden_size=256,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=704,
        vocab_size=32000,
    ),
)


# Decode steps timed per (model, cache), after one warm-up step.
DECODE_STEPS = 24
# Compiled graphs per function under `compile`: one per training length and per Llama decode length (its cache grows
# with the context), for two Llamas, is more than torch's default limit of 8 allows before it stops compiling.
RECOMPILE_LIMIT = 32


# SmolLM2-135M-Instruct's shape (`--model smollm2`): the real model of the README's long-context results.
SMOLLM2_DIMS = dict(
    hidden_size=576,
    num_hidden_layers=30,
    num_attention_heads=9,
    num_key_value_heads=3,
    head_dim=64,
    intermediate_size=1536,
    vocab_size=49152,
    tie_word_embeddings=True,
    rope_parameters={"rope_type": "default", "rope_theta": 100000.0},
)
# The fields of a model's config that decide its speed (weights do not: both models are built with random ones).
SHAPE_FIELDS = tuple(SMOLLM2_DIMS)


def with_model_shape(settings: dict, model: str | None) -> dict:
    """`settings` with the dims of `model`: None keeps the benchmark's own, "smollm2" is SmolLM2-135M's shape, else
    a model folder or hub id whose config gives the dims (and, for a LlamaMem config, the window and the surprisal
    threshold of its writes)."""
    if model is None:
        return settings
    if model == "smollm2":
        return {**settings, "dims": dict(SMOLLM2_DIMS)}
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model)
    dims = {name: getattr(config, name) for name in SHAPE_FIELDS if getattr(config, name, None) is not None}
    window = getattr(config, "sliding_window", None) or settings["window"]
    threshold = getattr(config, "memory_write_surprisal_threshold", None)
    return {**settings, "dims": dims, "window": window, "surprisal_threshold": threshold}


def build(settings):
    torch.manual_seed(0)
    config = LlamaMemConfig(
        **settings["dims"],
        sliding_window=settings["window"],
        memory_write_surprisal_threshold=settings.get("surprisal_threshold"),
    )
    mem = LlamaMemForCausalLM(config).eval()
    llama = LlamaForCausalLM(LlamaConfig(**settings["dims"])).eval()
    return {"llama_mem": mem, "llama": llama}


def llama_with_same_loss(settings) -> LlamaForCausalLM:
    """transformers' Llama computing its training loss as LlamaMem does."""
    llama = LlamaForCausalLM(LlamaConfig(**settings["dims"])).eval()
    llama.loss_function = causal_lm_loss
    return llama


def train_step_seconds(model, ids) -> float:
    model.train()
    start = time.perf_counter()
    model(ids, labels=ids).loss.backward()
    elapsed = time.perf_counter() - start
    model.zero_grad(set_to_none=True)
    model.eval()
    return elapsed


def train_tokens_per_s(models: dict, length: int, repeats: int) -> dict:
    """Training tokens/s of each model (one forward + backward), the best of `repeats` steps after a warm-up. The
    models take turns, so a slow spell of a shared machine hits both rather than one."""
    ids = torch.randint(0, next(iter(models.values())).config.vocab_size, (1, length))
    for model in models.values():
        train_step_seconds(model, ids)  # warm-up
    best = {name: float("inf") for name in models}
    for _ in range(repeats):
        for name, model in models.items():
            best[name] = min(best[name], train_step_seconds(model, ids))
    return {name: length / seconds for name, seconds in best.items()}


@torch.no_grad()
def prefill(model, length):
    """Tokens/s of one prefill of `length` tokens, its peak extra resident memory (bytes) and the cache."""
    cache = DynamicCache(config=model.config)
    ids = torch.randint(0, model.config.vocab_size, (1, length))
    with PeakMemory() as memory:
        start = time.perf_counter()
        model(ids, use_cache=True, logits_to_keep=1, **{CACHE_FIELD: cache})
        elapsed = time.perf_counter() - start
    return length / elapsed, memory.peak_extra, cache


def prefill_rates(models: dict, length: int, repeats: int) -> tuple[dict, dict, dict]:
    """Prefill tokens/s of each model, the best of `repeats` prefills (the models take turns, as in training); the
    largest peak extra memory of any of them; and the cache of each model's last prefill."""
    rates, peaks, caches = dict.fromkeys(models, 0.0), dict.fromkeys(models, 0), dict.fromkeys(models)
    for _ in range(repeats):
        for name, model in models.items():
            caches[name] = None  # not held through the next prefill
            rate, peak, caches[name] = prefill(model, length)
            rates[name], peaks[name] = max(rates[name], rate), max(peaks[name], peak)
    return rates, peaks, caches


def release_free_memory() -> None:
    """glibc's malloc_trim(0): return free heap memory to the system (a no-op where glibc is absent)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class PeakMemory:
    """Peak resident memory above the level at entry, sampled every few milliseconds (CPU; Linux /proc)."""

    def __init__(self, interval: float = 0.005):
        self.interval, self.peak_extra = interval, 0
        self._stop = threading.Event()

    @staticmethod
    def resident() -> int:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def _sample(self):
        while not self._stop.is_set():
            self.peak_extra = max(self.peak_extra, self.resident() - self.start)
            time.sleep(self.interval)

    def __enter__(self):
        # Hand freed heap pages back first: otherwise memory freed by an earlier measurement is reused without
        # raising the resident size, and the peak reads as zero.
        release_free_memory()
        self.start = self.resident()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak_extra = max(self.peak_extra, self.resident() - self.start)


def compiled(model):
    """The model under torch.compile for the `compile` rows: static shapes, one graph per input shape (as a
    deployment compiles for its shapes; a dynamic-shape graph would be slower), inductor's default mode."""
    return torch.compile(model, dynamic=False)


@torch.no_grad()
def static_cache_after_prefill(model, length: int) -> StaticCache:
    """A StaticCache that has read `length` random tokens (an eager prefill), with room for the decode steps."""
    cache = StaticCache(config=model.config, max_cache_len=length + DECODE_STEPS + 1)
    ids = torch.randint(0, model.config.vocab_size, (1, length))
    model(ids, use_cache=True, logits_to_keep=1, **{CACHE_FIELD: cache})
    return cache


@torch.no_grad()
def decode_ms(runs: dict, steps=DECODE_STEPS) -> dict:
    """Milliseconds per generated token of each (model, cache) in `runs`: the median of `steps` single-token steps
    (a median, because one stall of a shared machine would otherwise move a mean of a few steps). The entries take
    turns step by step, so that a slow spell hits all of them rather than one."""
    token = torch.randint(0, min(model.config.vocab_size for model, _ in runs.values()), (1, 1))
    times = {name: [] for name in runs}
    for step in range(steps + 1):  # step 0 warms up
        for name, (model, cache) in runs.items():
            start = time.perf_counter()
            model(token, use_cache=True, **{CACHE_FIELD: cache})
            if step:
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(entry) * 1e3 for name, entry in times.items()}


def cache_bytes(cache):
    """Every tensor the cache holds: windows, memory entries, states and, with surprisal-gated writes, the windowed
    pass's own cache and the kept next-token prediction."""
    total = 0
    for layer in cache.layers:
        # the memory's per-token entries beside the window; the gate's prediction [B, vocab]
        for name in ("keys", "values", "memory_entries", "next_token_log_probs"):
            tensor = getattr(layer, name, None)
            total += tensor.numel() * tensor.element_size() if tensor is not None else 0
        for states in (getattr(layer, "conv_states", {}), getattr(layer, "recurrent_states", {})):
            total += sum(t.numel() * t.element_size() for t in states.values() if t is not None)
        windowed = getattr(layer, "windowed_cache", None)
        total += cache_bytes(windowed) if windowed is not None else 0
    return total


def train_flops_per_token(model, length: int) -> float:
    """Model FLOPs of one training token (forward + backward): 6 per weight that multiplies (all but the input
    embedding, unless tied to the output layer) plus the attention products, 12 * layers * heads * head_dim per key
    attended, averaged over the sequence with the model's window (the whole causal prefix for Llama). The memory
    branch's own arithmetic is left out (under 1% of the total at these sizes)."""
    config = model.config
    params = sum(p.numel() for p in model.parameters())
    if not config.tie_word_embeddings:
        params -= model.get_input_embeddings().weight.numel()
    window = getattr(config, "sliding_window", None) or length
    mean_attended = sum(min(t + 1, window) for t in range(length)) / length
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    attention = 12 * config.num_hidden_layers * config.num_attention_heads * head_dim * mean_attended
    return 6 * params + attention


def matmul_peak_flops(size=2048, repeats=5):
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * size**3 * repeats / (time.perf_counter() - start)


def run_benchmark(settings: dict, report: Callable[[str], None] = lambda line: None, compile: bool = False) -> dict:
    """Measure everything in `settings` (FULL or QUICK); `report` receives each markdown table line as it comes.
    `compile`: training and decode again with both models compiled (module docstring)."""
    limit = torch._dynamo.config.patch(recompile_limit=RECOMPILE_LIMIT) if compile else contextlib.nullcontext()
    with limit:
        return measure(settings, report, compile)


def measure(settings: dict, report: Callable[[str], None], compile: bool) -> dict:
    models = build(settings)
    compiled_models = {name: compiled(model) for name, model in models.items()} if compile else {}
    results = {
        "settings": settings,
        # glibc malloc tunables (MALLOC_MMAP_THRESHOLD_, MALLOC_TRIM_THRESHOLD_) change how often freed memory is
        # faulted in again, which on some machines costs a third of a long training step: recorded with the figures.
        "malloc_environment": {name: value for name, value in os.environ.items() if name.startswith("MALLOC_")},
        "matmul_peak_gflops": matmul_peak_flops() / 1e9,
        "compiled": compile,
        "rows": [],
    }

    def add(metric, values, higher_is_better):
        ratio = values["llama_mem"] / values["llama"]
        results["rows"].append({"metric": metric, **values, "ratio": ratio, "higher_is_better": higher_is_better})
        report(f"| {metric} | {values['llama_mem']:.4g} | {values['llama']:.4g} | {ratio:.2f}x |")

    report("| metric | LlamaMem | Llama | ratio LlamaMem / Llama |")
    report("|---|---|---|---|")
    train_rates = {}
    contenders = {**models, "llama_same_loss": llama_with_same_loss(settings)}
    for length in settings["train"]:
        train_rates[length] = rates = train_tokens_per_s(contenders, length, settings["train_repeats"])
        add(f"train tokens/s @ {length}", {name: rates[name] for name in models}, True)
        add(
            f"train tokens/s @ {length}, Llama with LlamaMem's loss",
            {"llama_mem": rates["llama_mem"], "llama": rates["llama_same_loss"]},
            True,
        )
        if compile:
            rates = train_tokens_per_s(
                {name: compiled(model) for name, model in contenders.items()}, length, settings["train_repeats"]
            )
            add(f"train tokens/s @ {length}, compiled", {name: rates[name] for name in models}, True)
            add(
                f"train tokens/s @ {length}, compiled, Llama with LlamaMem's loss",
                {"llama_mem": rates["llama_mem"], "llama": rates["llama_same_loss"]},
                True,
            )
    del contenders
    shortest, longest = min(settings["decode"]), max(settings["decode"])
    own_caches = {}  # LlamaMem's caches at the shortest and longest decode context, for its own decode ratio
    for length in sorted(set(settings["prefill"]) | set(settings["decode"])):
        repeats = settings["prefill_repeats"] if length in settings["prefill"] else 1
        rates, peaks, caches = prefill_rates(models, length, repeats)
        decode = decode_ms({name: (model, caches[name]) for name, model in models.items()})
        sizes = {name: cache_bytes(cache) for name, cache in caches.items()}
        if length in (shortest, longest):
            own_caches[length] = caches["llama_mem"]
        del caches
        if length in settings["prefill"]:
            add(f"prefill tokens/s @ {length}", rates, True)
            add(f"prefill peak extra memory MB @ {length}", {n: b / 2**20 for n, b in peaks.items()}, False)
        if length in settings["decode"]:
            add(f"decode ms/token @ {length}", decode, False)
            if compile:
                static = {name: static_cache_after_prefill(model, length) for name, model in models.items()}
                runs = {name: (compiled_models[name], static[name]) for name in models}
                add(f"decode ms/token @ {length}, compiled", decode_ms(runs), False)
                del static, runs
        add(f"cache MB @ {length}", {n: b / 2**20 for n, b in sizes.items()}, False)
    # Measured again with the two contexts taking turns: a slow spell during one length's rows would otherwise
    # decide this ratio.
    own_decode = decode_ms({length: (models["llama_mem"], cache) for length, cache in own_caches.items()})
    results["own_decode_ratio"] = own_decode[longest] / own_decode[shortest]
    report(f"| LlamaMem decode @ {longest} / @ {shortest}, in turns | {results['own_decode_ratio']:.2f}x | | |")
    length, peak = settings["train"][0], results["matmul_peak_gflops"] * 1e9
    mfu = {
        name: train_flops_per_token(model, length) * train_rates[length][name] / peak for name, model in models.items()
    }
    results["train_mfu"] = mfu["llama_mem"]
    peak_text = f"{results['matmul_peak_gflops']:.0f} GFLOP/s"
    add(
        f"training MFU % @ {length} (model FLOPs over a measured {peak_text} matmul peak)",
        {n: 100 * m for n, m in mfu.items()},
        True,
    )
    return results


def write_results(results: dict, json_path: str, table_lines: list[str]) -> None:
    with open(json_path, "w") as handle:
        json.dump(results, handle, indent=2)
    with open(os.path.splitext(json_path)[0] + ".md", "w") as handle:
        handle.write("\n".join(table_lines) + "\n")
