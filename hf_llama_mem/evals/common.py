"""Shared pieces of the evaluation tasks: seeded generation and scoring of answers at known positions."""

import torch


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
