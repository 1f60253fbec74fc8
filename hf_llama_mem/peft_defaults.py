"""PEFT presets for model_type "llama_mem": the default target modules of every PEFT method that has a Llama entry.

PEFT picks default `target_modules` by model type and refuses a type it does not know; LlamaMem keeps Llama's module
names, so Llama's defaults apply unchanged (LoRA: q_proj and v_proj). To also train the memory fully (its gates,
decay and write projections, key convolution), add `modules_to_save=["memory"]` to the PEFT config: each layer's
memory module is then trained and saved with the adapter.
"""

__all__ = ["register_peft_defaults"]


def register_peft_defaults() -> None:
    """Add "llama_mem" to PEFT's default-target tables (no-op if PEFT is not installed). Called on import."""
    try:
        from peft.utils import constants
    except ImportError:
        return
    for name, table in vars(constants).items():
        if name.startswith("TRANSFORMERS_MODELS_TO_") and isinstance(table, dict) and "llama" in table:
            table.setdefault("llama_mem", table["llama"])
