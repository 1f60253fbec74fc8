"""Long-context evaluation tasks, one file each, on the small base in common.py; `run.py` drives them for the CLI."""

from .passkey import PasskeyRetrieval, RecallTokenFormat, TextFormat
from .perplexity import PerplexityByPosition
from .recall import AssociativeRecall

__all__ = ["AssociativeRecall", "PasskeyRetrieval", "PerplexityByPosition", "RecallTokenFormat", "TextFormat"]
