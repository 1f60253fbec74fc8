"""Passkey retrieval: a number hidden at a chosen depth in filler, asked for at the end.

A sample of length L with depth d is: filler, the needle (which states the passkey) at d of the way through, more
filler, then the question, whose answer tokens are scored. A sample counts as correct when every answer token is the
greedy prediction. Accuracy is reported per (length, depth), per length and per depth.

Two formats share the task (`PasskeyOptions.format`):
- "text", `TextFormat(tokenizer)`: English sentences in any tokenizer ("The pass key is 71432. Remember it. ...").
- "recall-tokens", `RecallTokenFormat(task)`: the token vocabulary of the associative-recall task
  (hf_llama_mem.evals.recall), for models such as the demo's, which read ids rather than text (no tokenizer): the
  needle is `digits` key-value pairs, the question the same keys, the answer their values.
"""

from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .common import Task, exact_match, figure, require, require_positive, require_values, seeded_generator
from .recall import AssociativeRecall

__all__ = ["FORMATS", "PasskeyOptions", "PasskeyTask", "RecallTokenFormat", "TextFormat", "summarize"]

FORMATS = ("text", "recall-tokens")

FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "


@dataclass
class TextFormat:
    tokenizer: object
    digits: int = 5

    def encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False).input_ids

    def sample(self, generator: torch.Generator) -> tuple[list[int], list[int], list[int]]:
        """(needle, query, query labels) for a fresh random passkey; labels are -100 except on the answer."""
        key = "".join(str(d) for d in torch.randint(0, 10, (self.digits,), generator=generator).tolist())
        needle = self.encode(f"The pass key is {key}. Remember it. {key} is the pass key. ")
        question, answer = self.encode("What is the pass key? The pass key is"), self.encode(f" {key}")
        return needle, question + answer, [-100] * len(question) + answer

    def filler(self, length: int, generator: torch.Generator) -> list[int]:
        unit = self.encode(FILLER)
        return (unit * (length // len(unit) + 1))[:length]


@dataclass
class RecallTokenFormat:
    task: AssociativeRecall = field(default_factory=AssociativeRecall)
    digits: int = 5

    def sample(self, generator: torch.Generator) -> tuple[list[int], list[int], list[int]]:
        """(needle, query, query labels): the needle is `digits` key-value pairs; the query repeats them, as the
        recall task asks, and only the values are scored."""
        keys = torch.randperm(self.task.num_keys, generator=generator)[: self.digits]
        values = torch.randint(0, self.task.num_values, (self.digits,), generator=generator) + self.task.num_keys
        needle = torch.stack([keys, values], 1).flatten().tolist()
        return needle, needle, [-100 if i % 2 == 0 else token for i, token in enumerate(needle)]

    def filler(self, length: int, generator: torch.Generator) -> list[int]:
        first_filler = self.task.num_keys + self.task.num_values
        return (torch.randint(0, self.task.num_filler, (length,), generator=generator) + first_filler).tolist()


@dataclass(frozen=True)
class PasskeyOptions:
    """Context `lengths` (tokens, the question included), needle `depths` (0 = first token, 1 = just before the
    question), `samples` per (length, depth), the `format` ("text" or "recall-tokens") and the passkey's `digits`."""

    lengths: tuple[int, ...] = (256, 1024, 4096)
    depths: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0)
    samples: int = 8
    format: Literal["text", "recall-tokens"] = "text"
    digits: int = 5

    def __post_init__(self):
        require_values("lengths", self.lengths, 1)
        require(all(isinstance(n, int) for n in self.lengths), f"lengths must be integers, got {self.lengths!r}.")
        require_values("depths", self.depths, 0.0, 1.0)
        require_positive("samples", self.samples)
        require_positive("digits", self.digits)
        require(self.format in FORMATS, f"format must be one of {FORMATS}, got {self.format!r}.")


class PasskeyTask(Task):
    name = "passkey"

    def __init__(self, options: PasskeyOptions | None = None):
        self.options = options or PasskeyOptions()

    def needs_tokenizer(self) -> bool:
        return self.options.format == "text"

    def format_for(self, tokenizer) -> TextFormat | RecallTokenFormat:
        if self.options.format == "recall-tokens":
            return RecallTokenFormat(digits=self.options.digits)
        require(tokenizer is not None, "The text passkey needs a tokenizer (or format 'recall-tokens').")
        return TextFormat(tokenizer, digits=self.options.digits)

    def check(self, model, tokenizer=None) -> None:
        """Every length holds the passkey and every id fits the model's vocabulary, before any sample is scored."""
        fmt = self.format_for(tokenizer)
        sample = self.build(fmt, max(self.options.lengths), 0.5, seeded_generator(0), check_length=False)
        largest = int(sample["input_ids"].max())
        require(
            largest < model.config.vocab_size,
            f"The passkey's token ids reach {largest}, beyond this model's vocabulary of {model.config.vocab_size}"
            + (": is it a model of the recall task's ids?" if self.options.format == "recall-tokens" else "."),
        )
        for length in self.options.lengths:
            self.build(fmt, length, 0.5, seeded_generator(0))

    def build(
        self, fmt, length: int, depth: float, generator: torch.Generator, check_length: bool = True
    ) -> dict[str, torch.Tensor]:
        """One sample of exactly `length` tokens: input_ids and labels [1, length]."""
        needle, query, query_labels = fmt.sample(generator)
        filler_length = length - len(needle) - len(query)
        if filler_length < 0 and check_length:
            raise ValueError(f"length {length} is shorter than the passkey itself ({length - filler_length} tokens).")
        if not 0.0 <= depth <= 1.0:
            raise ValueError(f"depth must be in [0, 1], got {depth}.")
        filler = fmt.filler(max(filler_length, 0), generator)
        split = round(depth * len(filler))
        ids = filler[:split] + needle + filler[split:] + query
        labels = [-100] * (len(ids) - len(query)) + query_labels
        return {"input_ids": torch.tensor([ids]), "labels": torch.tensor([labels])}

    @torch.no_grad()
    def evaluate(self, model, tokenizer=None, *, seed: int = 0, progress: bool = True) -> dict:
        fmt = self.format_for(tokenizer)
        lengths, depths, samples = self.options.lengths, self.options.depths, self.options.samples
        generator = seeded_generator(seed)
        was_training = model.training
        model.eval()
        grid = {}
        cells = [(length, depth) for length in lengths for depth in depths]
        for length, depth in tqdm(cells, desc="passkey", disable=not progress):
            correct = 0
            for _ in range(samples):
                sample = self.build(fmt, length, depth, generator)
                # Only the query's logits are needed: the prediction of its first token onwards.
                keep = int(sample["labels"].ne(-100).nonzero()[0, 1].item())
                ids = sample["input_ids"].to(model.device)
                logits = model(input_ids=ids, logits_to_keep=length - keep + 1).logits.cpu()
                correct += int(exact_match(logits, sample["labels"][:, keep - 1 :]).item())
            grid[(length, depth)] = correct / samples
        model.train(was_training)
        return summarize(grid, lengths, depths)

    @torch.no_grad()
    def answer_loss(self, model, tokenizer=None, *, seed: int = 0) -> float:
        """Mean cross-entropy of the answer tokens over the same samples as `evaluate` (a finer measure than exact
        match, for a model that retrieves most digits of a key)."""
        fmt, generator, losses = self.format_for(tokenizer), seeded_generator(seed), []
        for length in self.options.lengths:
            for depth in self.options.depths:
                for _ in range(self.options.samples):
                    sample = self.build(fmt, length, depth, generator)
                    logits = model(input_ids=sample["input_ids"].to(model.device)).logits[0, :-1].float().cpu()
                    losses.append(F.cross_entropy(logits, sample["labels"][0, 1:], ignore_index=-100).item())
        return sum(losses) / len(losses)

    def table(self, results: dict) -> str:
        depths = results["depths"]
        rows = ["| length \\ depth | " + " | ".join(f"{d:g}" for d in depths) + " | mean |"]
        rows.append("|---" * (len(depths) + 2) + "|")
        for length, row in zip(results["lengths"], results["grid"], strict=True):
            mean = results["by_length"][str(length)]
            rows.append(f"| {length} | " + " | ".join(f"{v:.2f}" for v in row) + f" | {mean:.2f} |")
        return "\n".join(rows)

    def card_rows(self, results: dict) -> list[dict]:
        return [
            {"setting": f"length {length}", "metric": "accuracy", "value": accuracy}
            for length, accuracy in results["by_length"].items()
        ]

    def plot(self, results: dict, path: str, title: str = "") -> None:
        labels = ("context length (tokens)", "passkey accuracy")
        with figure(path, title or self.name, *labels, log2_x=True, ylim=(-0.05, 1.05)) as axis:
            for depth_index, depth in enumerate(results["depths"]):
                values = [row[depth_index] for row in results["grid"]]
                axis.plot(results["lengths"], values, marker="o", label=f"depth {depth:g}")


def summarize(grid: dict[tuple[int, float], float], lengths, depths) -> dict:
    return {
        "task": "passkey",
        "accuracy": sum(grid.values()) / len(grid),
        "by_length": {str(length): sum(grid[(length, d)] for d in depths) / len(depths) for length in lengths},
        "by_depth": {str(depth): sum(grid[(n, depth)] for n in lengths) / len(lengths) for depth in depths},
        "grid": [[grid[(length, depth)] for depth in depths] for length in lengths],
        "lengths": list(lengths),
        "depths": list(depths),
    }
