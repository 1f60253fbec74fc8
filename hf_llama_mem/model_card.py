"""Model cards for saved LlamaMem models, rendered from the template in model_cards/ (shipped in the package).

`save_pretrained` writes README.md through `write_model_card` (the package installs it as the model classes' card
writer), so every saved folder and every `push_to_hub` upload carries a card that describes the architecture and
memory settings and, when `eval_results.json` exists next to the weights, the evaluation table.
"""

import json
import os
from importlib import resources
from pathlib import Path

from huggingface_hub import ModelCard

__all__ = ["EVAL_RESULTS_FILE", "record_eval_results", "render_model_card", "write_model_card"]

EVAL_RESULTS_FILE = "eval_results.json"
CARD_MARKER = "<!-- written by hf-llama-mem"
DEFAULT_TAGS = ("llama_mem", "long-context", "memory", "custom_code")


def template_text() -> str:
    """The card template: installed inside the package as hf_llama_mem.model_cards; in a source checkout used
    without installing (PYTHONPATH), model_cards/ at the top of the repository."""
    try:
        return resources.files("hf_llama_mem.model_cards").joinpath("llama_mem.md").read_text()
    except ModuleNotFoundError:
        return (Path(__file__).resolve().parents[1] / "model_cards" / "llama_mem.md").read_text()


def evaluation_table(results: dict[str, list[dict]]) -> str:
    """Markdown table of `{task: [{"setting": ..., "metric": ..., "value": ...}, ...]}`."""
    if not results:
        return "No evaluation recorded yet: `hf-llama-mem eval TASK --model PATH` adds its results here."
    rows = ["| task | setting | metric | value |", "|---|---|---|---|"]
    for task, entries in sorted(results.items()):
        rows += [f"| {task} | {e['setting']} | {e['metric']} | {e['value']:.4g} |" for e in entries]
    return "\n".join(rows)


def render_model_card(
    config, model_name: str, results: dict | None = None, base_model: str | None = None, tags: list[str] = ()
) -> str:
    memory_layers = list(range(config.num_hidden_layers)) if config.memory_layers is None else config.memory_layers
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return template_text().format(
        model_name=model_name,
        extra_metadata="".join(f"- {tag}\n" for tag in tags) + (f"base_model: {base_model}\n" if base_model else ""),
        num_hidden_layers=config.num_hidden_layers,
        hidden_size=config.hidden_size,
        num_attention_heads=config.num_attention_heads,
        num_key_value_heads=config.num_key_value_heads,
        vocab_size=config.vocab_size,
        sliding_window=config.sliding_window,
        memory_rule=config.memory_rule,
        memory_layers=", ".join(map(str, memory_layers)) or "none (plain sliding-window baseline)",
        memory_chunk_size=config.memory_chunk_size,
        memory_conv_size=config.memory_conv_size,
        memory_state=f"{config.num_key_value_heads} x {head_dim} x {head_dim} float32 per layer",
        evaluation=evaluation_table(results or {}),
    )


def read_eval_results(*folders: str | os.PathLike | None) -> dict:
    results = {}
    for folder in folders:
        path = os.path.join(folder, EVAL_RESULTS_FILE) if folder else None
        if path and os.path.isfile(path):
            with open(path) as handle:
                results.update(json.load(handle))
    return results


def write_model_card(
    config,
    save_directory: str | os.PathLike,
    results_from: str | None = None,
    base_model: str | None = None,
    model_name: str | None = None,
    tags: list[str] = (),
) -> None:
    """Write README.md in `save_directory`, unless it holds a card that someone else wrote, from `config` and the
    evaluation results recorded there or in `results_from` (the folder a model was loaded from, so a reloaded model
    pushes its evaluation table). A base model named by an earlier card of ours is kept. `model_name` defaults to
    the folder's name; `tags` are added to the card's metadata."""
    readme = os.path.join(save_directory, "README.md")
    if os.path.isfile(readme):
        existing = ModelCard.load(readme)
        if CARD_MARKER not in existing.text:
            return
        base_model = base_model or existing.data.base_model
    results = read_eval_results(results_from, save_directory)
    if results:
        with open(os.path.join(save_directory, EVAL_RESULTS_FILE), "w") as handle:
            json.dump(results, handle, indent=2)
    name = model_name or os.path.basename(os.path.normpath(os.fspath(save_directory)))
    text = render_model_card(config, name, results, base_model, [t for t in tags if t not in DEFAULT_TAGS])
    ModelCard(text, ignore_metadata_errors=False)  # parses the metadata: a bad card fails here, not on the Hub
    with open(readme, "w") as handle:
        handle.write(text)


def record_eval_results(model_folder: str | os.PathLike, task: str, entries: list[dict]) -> None:
    """Add (or replace) one task's rows in the model folder's eval_results.json and refresh its card."""
    from transformers import AutoConfig

    results = read_eval_results(model_folder)
    results[task] = entries
    with open(os.path.join(model_folder, EVAL_RESULTS_FILE), "w") as handle:
        json.dump(results, handle, indent=2)
    write_model_card(AutoConfig.from_pretrained(model_folder), model_folder)
