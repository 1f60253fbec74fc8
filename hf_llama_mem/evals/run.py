"""Run one evaluation task on a saved model: load it, run the task, write JSON and a plot, record the card's rows.

`hf-llama-mem eval TASK --model PATH` is a thin layer over `run_eval`; everything here takes typed arguments.
"""

import json
import os

from ..model_card import record_eval_results
from .common import Task

__all__ = ["BYTE_TOKENIZER", "load_model", "load_model_and_tokenizer", "load_tokenizer", "run_eval"]

# The name that selects transformers' ByT5Tokenizer (bytes; no files, works offline) instead of a saved tokenizer.
BYTE_TOKENIZER = "byt5"


def load_tokenizer(model: str, tokenizer: str | None = None):
    """The tokenizer named by `tokenizer` (a folder or hub id; "byt5" for bytes), else the one saved with `model`.
    A model without a tokenizer is an error, never a silent guess: the ids would mean something else to it."""
    from transformers import AutoTokenizer, ByT5Tokenizer

    if tokenizer == BYTE_TOKENIZER:
        return ByT5Tokenizer()
    source = tokenizer or model
    try:
        return AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError, KeyError) as error:
        if tokenizer:
            raise ValueError(f"Cannot load the tokenizer {tokenizer!r}: {first_line(error)}") from error
        raise ValueError(
            f"{model} has no tokenizer: pass --tokenizer with a tokenizer folder, or --tokenizer {BYTE_TOKENIZER} "
            "for a model trained on bytes (such as the examples' models)."
        ) from error


def load_model(model: str):
    """A saved causal LM, in eval mode."""
    from transformers import AutoModelForCausalLM

    try:
        return AutoModelForCausalLM.from_pretrained(model).eval()
    except OSError as error:
        raise OSError(f"Cannot load the model {model!r}: {first_line(error)}") from error


def load_model_and_tokenizer(model: str, tokenizer: str | None = None):
    """The model and its tokenizer (see load_tokenizer); the tokenizer first, as it is the quicker to fail."""
    loaded_tokenizer = load_tokenizer(model, tokenizer)
    return load_model(model), loaded_tokenizer


def first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def run_eval(
    task: Task,
    model: str,
    output_dir: str = "eval_output",
    *,
    seed: int = 0,
    record: bool = True,
    tokenizer: str | None = None,
    progress: bool = True,
) -> dict:
    """Run `task` on the model at `model`; write <output_dir>/<task>.json and .png; with `record`, add the rows to
    the model folder's eval_results.json and card (LlamaMem folders only). Anything that can be checked (the output
    folder, the tokenizer, whether the model fits the task) is checked before the task runs. Prints nothing."""
    os.makedirs(output_dir, exist_ok=True)
    if not os.access(output_dir, os.W_OK):
        raise PermissionError(f"The output folder {output_dir} is not writable.")
    if task.needs_tokenizer():
        loaded, text_tokenizer = load_model_and_tokenizer(model, tokenizer)
    else:
        if tokenizer is not None:
            raise ValueError(f"The {task.name} task reads token ids: a tokenizer ({tokenizer!r}) would not be used.")
        loaded, text_tokenizer = load_model(model), None
    task.check(loaded, text_tokenizer)
    results = task.evaluate(loaded, text_tokenizer, seed=seed, progress=progress)
    results["model"] = model
    with open(os.path.join(output_dir, f"{task.name}.json"), "w") as handle:
        json.dump(results, handle, indent=2)
    task.plot(results, os.path.join(output_dir, f"{task.name}.png"), title=f"{task.name}: {model}")
    if record and os.path.isdir(model) and loaded.config.model_type == "llama_mem":
        record_eval_results(model, task.name, task.card_rows(results))
    return results
