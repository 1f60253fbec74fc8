"""Long-context evaluation tasks, one file each, on the small base in common.py (`Task`: evaluate, table, card
rows, plot); `run.run_eval` loads a model and runs any of them for the CLI (`hf-llama-mem eval TASK`)."""

from .common import Task
from .passkey import PasskeyOptions, PasskeyTask, RecallTokenFormat, TextFormat
from .perplexity import PerplexityByPosition, PerplexityOptions, PerplexityTask
from .recall import AssociativeRecall, RecallOptions, RecallTask
from .run import run_eval

__all__ = [
    "AssociativeRecall",
    "PasskeyOptions",
    "PasskeyTask",
    "PerplexityByPosition",
    "PerplexityOptions",
    "PerplexityTask",
    "RecallOptions",
    "RecallTask",
    "RecallTokenFormat",
    "Task",
    "TextFormat",
    "run_eval",
]
