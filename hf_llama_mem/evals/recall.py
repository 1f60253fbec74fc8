"""Associative recall beyond the window: key-value pairs, a gap of filler, then every key again.

Layout of one sequence (token ids in three disjoint ranges: keys, values, filler):
    k1 v1 k2 v2 ... kK vK | gap of filler tokens | k_p(1) v_p(1) ... k_p(K) v_p(K)
where p is a random order. The answers are the values after the repeated keys; each pair is at least `gap` tokens
(several windows) before its query, so only the memory can bring it back. Chance is 1 / num_values.

`AssociativeRecall` makes the sequences (the demo trains on them) and scores one gap; `RecallTask` is the evaluation
task (`hf-llama-mem eval recall`): accuracy by distance. The model reads token ids, so it needs no tokenizer, but its
vocabulary must hold the task's ids (the demo model's does).
"""

from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from .common import Task, answer_accuracy, figure, require, require_positive, require_values, seeded_generator

__all__ = ["AssociativeRecall", "RecallOptions", "RecallTask"]


@dataclass
class AssociativeRecall:
    num_pairs: int = 12
    gap: int = 64
    num_keys: int = 64
    num_values: int = 64
    num_filler: int = 16

    @property
    def vocab_size(self) -> int:
        return self.num_keys + self.num_values + self.num_filler

    @property
    def chance(self) -> float:
        return 1.0 / self.num_values

    def sample(self, batch_size: int, generator: torch.Generator, gap: int | None = None) -> dict[str, torch.Tensor]:
        """input_ids and labels [B, 4K + gap]; labels are -100 except at the recalled values."""
        gap = self.gap if gap is None else gap
        keys = torch.stack(
            [torch.randperm(self.num_keys, generator=generator)[: self.num_pairs] for _ in range(batch_size)]
        )
        values = torch.randint(0, self.num_values, (batch_size, self.num_pairs), generator=generator) + self.num_keys
        filler = (
            torch.randint(0, self.num_filler, (batch_size, gap), generator=generator) + self.num_keys + self.num_values
        )
        order = torch.stack([torch.randperm(self.num_pairs, generator=generator) for _ in range(batch_size)])
        asked_keys, asked_values = keys.gather(1, order), values.gather(1, order)
        pairs = torch.stack([keys, values], -1).flatten(1)
        queries = torch.stack([asked_keys, asked_values], -1).flatten(1)
        input_ids = torch.cat([pairs, filler, queries], dim=1)
        labels = torch.full_like(input_ids, -100)
        labels[:, -2 * self.num_pairs + 1 :: 2] = asked_values
        return {"input_ids": input_ids, "labels": labels}

    @torch.no_grad()
    def evaluate(
        self, model, num_sequences: int = 256, batch_size: int = 64, gap: int | None = None, seed: int = 1234
    ) -> dict[str, float]:
        """Recall accuracy at `gap` (default: the task's), on freshly seeded sequences."""
        generator = seeded_generator(seed)
        correct = []
        was_training = model.training
        model.eval()
        for start in range(0, num_sequences, batch_size):
            batch = self.sample(min(batch_size, num_sequences - start), generator, gap=gap)
            logits = model(input_ids=batch["input_ids"].to(model.device)).logits.cpu()
            correct.append(answer_accuracy(logits, batch["labels"]))
        model.train(was_training)
        gap = self.gap if gap is None else gap
        return {"accuracy": torch.cat(correct).float().mean().item(), "gap": gap, "chance": self.chance}


@dataclass(frozen=True)
class RecallOptions:
    """`gaps`: the distances between the pairs and their queries; `sequences` scored at each (in batches of
    `batch_size`); `layout`: the vocabulary and pair count, the demo's by default."""

    gaps: tuple[int, ...] = (64, 128, 256, 512, 1024)
    sequences: int = 256
    batch_size: int = 64
    layout: AssociativeRecall = field(default_factory=AssociativeRecall)

    def __post_init__(self):
        require_values("gaps", self.gaps, 0)
        require(all(isinstance(g, int) for g in self.gaps), f"gaps must be integers, got {self.gaps!r}.")
        require_positive("sequences", self.sequences)
        require_positive("batch_size", self.batch_size)


class RecallTask(Task):
    name = "recall"

    def __init__(self, options: RecallOptions | None = None):
        self.options = options or RecallOptions()

    def needs_tokenizer(self) -> bool:
        return False

    def check(self, model, tokenizer=None) -> None:
        layout = self.options.layout
        require(
            model.config.vocab_size >= layout.vocab_size,
            f"The recall task needs a vocabulary of at least {layout.vocab_size} ids (the demo model's); "
            f"this model has {model.config.vocab_size}.",
        )

    def evaluate(self, model, tokenizer=None, *, seed: int = 0, progress: bool = True) -> dict:
        """Recall accuracy at each gap, each on the same seeded stream of pairs."""
        layout = self.options.layout
        by_distance = {
            str(gap): layout.evaluate(model, self.options.sequences, self.options.batch_size, gap=gap, seed=seed)[
                "accuracy"
            ]
            for gap in tqdm(self.options.gaps, desc="recall", disable=not progress)
        }
        return {"task": self.name, "by_distance": by_distance, "chance": layout.chance}

    def table(self, results: dict) -> str:
        rows = ["| distance (gap) | accuracy |", "|---|---|"]
        rows += [f"| {gap} | {accuracy:.3f} |" for gap, accuracy in results["by_distance"].items()]
        return "\n".join(rows + [f"| chance | {results['chance']:.3f} |"])

    def card_rows(self, results: dict) -> list[dict]:
        return [
            {"setting": f"distance {gap}", "metric": "accuracy", "value": accuracy}
            for gap, accuracy in results["by_distance"].items()
        ]

    def plot(self, results: dict, path: str, title: str = "") -> None:
        labels = ("distance from pair to query (tokens)", "recall accuracy")
        with figure(path, title or self.name, *labels, log2_x=True, ylim=(-0.05, 1.05)) as axis:
            gaps = [int(g) for g in results["by_distance"]]
            axis.plot(gaps, list(results["by_distance"].values()), marker="o", label="accuracy")
            axis.axhline(results["chance"], color="gray", linestyle="--", label="chance")
