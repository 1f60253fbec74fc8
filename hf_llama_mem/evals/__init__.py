"""Long-context evaluation tasks, one file each, on the small base in common.py."""

from .recall import AssociativeRecall

__all__ = ["AssociativeRecall"]
