"""`hf-llama-mem eval TASK --model PATH`: load a model, run one task, write JSON and a plot, record the results."""

import json
import os
from pathlib import Path

import torch

from ..corpus import stdlib_source_files
from ..model_card import record_eval_results
from .passkey import PasskeyRetrieval, RecallTokenFormat, TextFormat
from .perplexity import PerplexityByPosition
from .recall import AssociativeRecall
from .report import card_entries, format_results, plot_results

TASKS = ("passkey", "recall", "perplexity")


def load_model_and_tokenizer(path: str):
    """A saved causal LM (in eval mode) and its tokenizer; the offline ByT5 byte tokenizer when it has none."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, ByT5Tokenizer

    model = AutoModelForCausalLM.from_pretrained(path).eval()
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError):
        tokenizer = ByT5Tokenizer()
    return model, tokenizer


def stream_documents(files: list[str], tokenizer, min_tokens: int) -> list[torch.Tensor]:
    """Token ids of each file that has at least `min_tokens` tokens (so every position bucket has every document)."""
    documents = []
    for path in files:
        ids = tokenizer(Path(path).read_text(errors="replace")).input_ids
        if len(ids) >= min_tokens:
            documents.append(torch.tensor(ids))
    if not documents:
        raise ValueError(f"None of the {len(files)} documents has at least {min_tokens} tokens; lower --max-tokens.")
    return documents


def run_task(task: str, model, tokenizer, options) -> dict:
    if task == "passkey":
        fmt = RecallTokenFormat() if options.format == "recall-tokens" else TextFormat(tokenizer)
        passkey = PasskeyRetrieval(lengths=options.lengths, depths=options.depths, samples=options.samples)
        return passkey.evaluate(model, fmt, seed=options.seed)
    if task == "recall":
        recall = AssociativeRecall()
        if model.config.vocab_size < recall.vocab_size:
            raise ValueError(
                f"The recall task needs a vocabulary of at least {recall.vocab_size} ids (the demo model's); "
                f"this model has {model.config.vocab_size}."
            )
        return recall.evaluate_by_distance(model, options.gaps, options.sequences, seed=options.seed)
    if task == "perplexity":
        files = options.files or stdlib_source_files("eval")
        documents = stream_documents(files, tokenizer, options.max_tokens)
        stream = PerplexityByPosition(max_tokens=options.max_tokens, segment=options.segment)
        window = getattr(model.config, "sliding_window", None) or options.window
        return stream.evaluate(model, documents, window=window)
    raise ValueError(f"Unknown task {task!r}; expected one of {TASKS}.")


def run_eval(task: str, model_path: str, options) -> dict:
    """Run `task` on the model at `model_path`; write <output_dir>/<task>.json and .png; print nothing."""
    model, tokenizer = load_model_and_tokenizer(model_path)
    results = run_task(task, model, tokenizer, options)
    results["model"] = model_path
    os.makedirs(options.output_dir, exist_ok=True)
    with open(os.path.join(options.output_dir, f"{task}.json"), "w") as handle:
        json.dump(results, handle, indent=2)
    plot_results(results, os.path.join(options.output_dir, f"{task}.png"), title=f"{task}: {model_path}")
    if options.record and os.path.isdir(model_path) and model.config.model_type == "llama_mem":
        record_eval_results(model_path, task, card_entries(results))
    return results


__all__ = ["TASKS", "format_results", "run_eval", "run_task"]
