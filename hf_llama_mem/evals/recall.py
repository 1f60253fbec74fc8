"""Associative recall beyond the window: key-value pairs, a gap of filler, then every key again.

Layout of one sequence (token ids in three disjoint ranges: keys, values, filler):
    k1 v1 k2 v2 ... kK vK | gap of filler tokens | k_p(1) v_p(1) ... k_p(K) v_p(K)
where p is a random order. The answers are the values after the repeated keys; each pair is at least `gap` tokens
(several windows) before its query, so only the memory can bring it back. Chance is 1 / num_values.
"""

from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from .common import answer_accuracy, seeded_generator


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

    def evaluate_by_distance(
        self, model, gaps: list[int], num_sequences: int = 256, seed: int = 1234, progress: bool = True
    ) -> dict:
        """Recall accuracy at each gap between the pairs and their queries."""
        by_distance = {
            str(gap): self.evaluate(model, num_sequences, gap=gap, seed=seed)["accuracy"]
            for gap in tqdm(gaps, desc="recall", disable=not progress)
        }
        return {"task": "recall", "by_distance": by_distance, "chance": self.chance}
