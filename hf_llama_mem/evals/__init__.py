"""Long-context evaluation tasks, one file each, on the small base in common.py (`Task`: evaluate, table, card
rows, plot): passkey, recall, perplexity, and ruler (lm-evaluation-harness, an optional extra: importing it needs
nothing beyond this package); `run.run_eval` loads a model and runs any of them for `hf-llama-mem eval TASK`."""

from .chat_recall import ChatRecallOptions, ChatRecallTask
from .common import Task
from .passkey import PasskeyOptions, PasskeyTask, RecallTokenFormat, TextFormat
from .perplexity import PerplexityByPosition, PerplexityOptions, PerplexityTask
from .recall import AssociativeRecall, RecallOptions, RecallTask
from .ruler import RulerOptions, RulerTask
from .run import run_eval

__all__ = [
    "AssociativeRecall",
    "ChatRecallOptions",
    "ChatRecallTask",
    "PasskeyOptions",
    "PasskeyTask",
    "PerplexityByPosition",
    "PerplexityOptions",
    "PerplexityTask",
    "RecallOptions",
    "RecallTask",
    "RecallTokenFormat",
    "RulerOptions",
    "RulerTask",
    "Task",
    "TextFormat",
    "run_eval",
]
