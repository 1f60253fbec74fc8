"""The small base every evaluation task stands on: the `Task` interface, option checks, seeded sampling, scoring of
answers at known positions, and the figure every task's plot is drawn on.

A task is one file: a frozen dataclass of typed options (checked when it is built, so a bad value fails before any
work) and a `Task` subclass that takes those options. The command line (hf_llama_mem.cli) builds the options from
its flags; `hf_llama_mem.evals.run.run_eval` loads a model, runs any task and records its results.
"""

import abc
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import ClassVar

import torch

__all__ = [
    "Task",
    "answer_accuracy",
    "exact_match",
    "figure",
    "require",
    "require_positive",
    "require_values",
    "seeded_generator",
]


class Task(abc.ABC):
    """One long-context evaluation. Subclasses set `name` (the results' "task" field and the CLI subcommand) and
    implement the four methods below; `results` is always the dict `evaluate` returned (JSON-serialisable)."""

    name: ClassVar[str]

    def needs_tokenizer(self) -> bool:
        """Whether `evaluate` reads text (and so needs the model's tokenizer) rather than token ids."""
        return True

    def check(self, model, tokenizer) -> None:
        """Raise ValueError if this model or tokenizer cannot run the task; called before any work is done."""
        return None

    @abc.abstractmethod
    def evaluate(self, model, tokenizer=None, *, seed: int = 0, progress: bool = True) -> dict:
        """Run the task; return its metrics with "task": self.name. Leaves the model's train/eval mode as it was."""

    @abc.abstractmethod
    def table(self, results: dict) -> str:
        """A markdown table of the results, for the terminal and the README."""

    @abc.abstractmethod
    def card_rows(self, results: dict) -> list[dict]:
        """The model card's evaluation rows: [{"setting": ..., "metric": ..., "value": float}, ...]."""

    @abc.abstractmethod
    def plot(self, results: dict, path: str, title: str = "") -> None:
        """Save a figure of the results to `path` (PNG)."""


def require(condition: bool, message: str) -> None:
    """The options' checks: a ValueError that names the option and its bad value."""
    if not condition:
        raise ValueError(message)


def require_positive(name: str, value: int) -> None:
    require(isinstance(value, int) and value >= 1, f"{name} must be a positive integer, got {value!r}.")


def require_values(name: str, values: Sequence, low: float, high: float = float("inf")) -> None:
    """A non-empty sequence of numbers, each in [low, high]."""
    require(len(values) > 0, f"{name} must not be empty.")
    for value in values:
        require(low <= value <= high, f"{name} must each be in [{low:g}, {high:g}], got {value!r}.")


def answer_accuracy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-answer correctness of next-token predictions: logits [B, T, V], labels [B, T] with -100 where no answer
    is asked. Position t's logits predict labels[t + 1], as in causal LM training. Returns a bool tensor [N]."""
    predictions = logits[:, :-1].argmax(-1)
    targets = labels[:, 1:]
    asked = targets != -100
    return predictions[asked] == targets[asked]


def exact_match(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-sequence correctness [B]: every asked token predicted (greedy, teacher-forced, which is what greedy
    decoding of the answer would produce). A sequence with no asked token is an error, not a free pass."""
    targets = labels[:, 1:]
    asked = targets != -100
    if not asked.any(dim=1).all():
        raise ValueError("exact_match: every sequence needs at least one labelled answer token.")
    correct = (logits[:, :-1].argmax(-1) == targets) | ~asked
    return correct.all(dim=1)


def seeded_generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@contextmanager
def figure(path: str, title: str, xlabel: str, ylabel: str, log2_x: bool = True, **axis_settings) -> Iterator:
    """A 7 x 4 inch matplotlib axis (Agg backend, no display needed), labelled, saved to `path` on exit."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axis = plt.subplots(figsize=(7, 4))
    try:
        yield axis
        if log2_x:
            axis.set_xscale("log", base=2)
        axis.set(xlabel=xlabel, ylabel=ylabel, title=title, **axis_settings)
        if axis.get_legend_handles_labels()[0]:
            axis.legend()
        fig.tight_layout()
        fig.savefig(path, dpi=100)
    finally:
        plt.close(fig)
