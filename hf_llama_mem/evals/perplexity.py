"""Perplexity by position on long documents, computed as a stream through the model's cache.

Each document is read in segments of `segment` tokens, each segment one forward that continues the cache, so memory
stays constant for LlamaMem however long the document is (for a model whose cache grows, such as full-attention
Llama, it grows as usual). Token losses are summed into position buckets: [0, W), [W, 2W), [2W, 4W), ... for a
window W. Lower perplexity in the far buckets for a memory model than for its no-memory twin is the evidence that
tokens long gone from the window still help.

`PerplexityByPosition` scores token-id documents (the `stream_perplexity` metric uses it too); `PerplexityTask` is
the evaluation task (`hf-llama-mem eval perplexity`): it reads text files with the model's tokenizer and scores them.
Works for any causal LM with a cache, so a baseline is scored the same way.
"""

import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers import DynamicCache

from ..corpus import stdlib_source_files
from ..modeling_llama_mem import CACHE_FIELD
from .common import Task, figure, require, require_positive

__all__ = [
    "DEFAULT_WINDOW",
    "PerplexityByPosition",
    "PerplexityOptions",
    "PerplexityTask",
    "bucket_perplexities",
    "position_buckets",
]

# The bucket base W for a model without a sliding window (full-attention Llama), unless the options set one.
DEFAULT_WINDOW = 1024


def position_buckets(window: int, max_tokens: int) -> list[tuple[int, int]]:
    """[0, W), [W, 2W), [2W, 4W), ... up to max_tokens (the last bucket is cut there)."""
    if window < 1 or max_tokens < 1:
        raise ValueError(f"window and max_tokens must be >= 1, got {window} and {max_tokens}.")
    edges = [0, min(window, max_tokens)]
    while edges[-1] < max_tokens:
        edges.append(min(2 * edges[-1], max_tokens))
    return list(zip(edges[:-1], edges[1:], strict=True))


def bucket_perplexities(nll_sums: list[float], counts: list[int]) -> list[float | None]:
    """exp(mean token loss) per bucket; None for a bucket no token reached."""
    return [math.exp(total / count) if count else None for total, count in zip(nll_sums, counts, strict=True)]


@dataclass
class PerplexityByPosition:
    max_tokens: int = 8192
    segment: int = 1024

    def __post_init__(self):
        require(
            isinstance(self.max_tokens, int) and self.max_tokens >= 2,
            f"max_tokens must be an integer >= 2 (one token predicted), got {self.max_tokens!r}.",
        )
        require_positive("segment", self.segment)

    @torch.no_grad()
    def evaluate(self, model, documents: list[torch.Tensor], window: int | None = None, progress: bool = True):
        """`documents`: 1-D token id tensors (each cut to max_tokens). `window` sets the buckets (default: the
        model's sliding_window). Returns buckets, perplexity and token count per bucket, and the overall value."""
        window = window or model.config.sliding_window
        buckets = position_buckets(window, self.max_tokens)
        nll_sums, counts = [0.0] * len(buckets), [0] * len(buckets)
        was_training = model.training
        model.eval()
        total = sum(min(len(d), self.max_tokens) - 1 for d in documents)
        bar = tqdm(total=total, desc="perplexity", unit="tok", disable=not progress)
        for document in documents:
            ids = document[: self.max_tokens].to(model.device).unsqueeze(0)
            losses = self.stream_losses(model, ids, bar)
            for index, (start, end) in enumerate(buckets):
                # losses[i] is the loss of predicting token i + 1, which sits at position i + 1.
                chunk = losses[max(start - 1, 0) : max(end - 1, 0)]
                nll_sums[index] += chunk.sum().item()
                counts[index] += chunk.numel()
        bar.close()
        model.train(was_training)
        return {
            "task": "perplexity",
            "buckets": [list(b) for b in buckets],
            "perplexity": bucket_perplexities(nll_sums, counts),
            "tokens": counts,
            "overall": math.exp(sum(nll_sums) / max(sum(counts), 1)),
            "documents": len(documents),
            "window": window,
        }

    def stream_losses(self, model, ids: torch.Tensor, bar) -> torch.Tensor:
        """Per-token next-token losses [T - 1] of one document, read segment by segment through the cache."""
        cache = DynamicCache(config=model.config)
        losses, previous_logit = [], None
        for start in range(0, ids.shape[1], self.segment):
            piece = ids[:, start : start + self.segment]
            logits = model(input_ids=piece, use_cache=True, **{CACHE_FIELD: cache}).logits[0].float()
            if previous_logit is not None:  # the last logit of the previous segment predicts this one's first token
                logits = torch.cat([previous_logit, logits])
                targets = piece[0]
            else:
                targets = piece[0, 1:]
            losses.append(F.cross_entropy(logits[: targets.shape[0]], targets, reduction="none").cpu())
            previous_logit = logits[-1:]
            bar.update(targets.shape[0])
        return torch.cat(losses)


@dataclass(frozen=True)
class PerplexityOptions:
    """`files`: text documents (None: the held-out standard-library sources, those with at least `max_tokens`
    tokens); each is read to `max_tokens` tokens in `segment`-token forwards. `window`: the bucket base W (None: the
    model's sliding_window, else DEFAULT_WINDOW)."""

    files: tuple[str, ...] | None = None
    max_tokens: int = 8192
    segment: int = 1024
    window: int | None = None

    def __post_init__(self):
        PerplexityByPosition(self.max_tokens, self.segment)  # checks those two
        require(self.files is None or len(self.files) > 0, "files must not be empty (None: the default corpus).")
        require(self.window is None or self.window >= 1, f"window must be a positive integer, got {self.window!r}.")


class PerplexityTask(Task):
    name = "perplexity"

    def __init__(self, options: PerplexityOptions | None = None):
        self.options = options or PerplexityOptions()

    def documents(self, tokenizer) -> list[torch.Tensor]:
        """Token ids of each document. Every document must fill all the buckets (at least max_tokens tokens), so
        each bucket averages over the same documents: a file named in `files` that is shorter is an error; of the
        default corpus, the shorter files are left out."""
        max_tokens, named = self.options.max_tokens, self.options.files is not None
        files = self.options.files if named else stdlib_source_files("eval")
        documents = []
        for path in files:
            ids = tokenizer(Path(path).read_text(errors="replace")).input_ids
            require(
                len(ids) >= max_tokens or not named,
                f"{path} has {len(ids)} tokens, fewer than max_tokens={max_tokens}: lower max_tokens or leave it out.",
            )
            if len(ids) >= max_tokens:
                documents.append(torch.tensor(ids))
        require(
            len(documents) > 0,
            f"None of the {len(files)} documents has at least {max_tokens} tokens; lower max_tokens.",
        )
        return documents

    def window(self, model) -> int:
        return self.options.window or getattr(model.config, "sliding_window", None) or DEFAULT_WINDOW

    def evaluate(self, model, tokenizer=None, *, seed: int = 0, progress: bool = True) -> dict:
        """Perplexity by position (deterministic: `seed` is unused)."""
        require(tokenizer is not None, "The perplexity task reads text: it needs a tokenizer.")
        documents = self.documents(tokenizer)
        largest = max(int(d.max()) for d in documents)
        require(
            largest < model.config.vocab_size,
            f"The tokenizer gives ids up to {largest}, beyond this model's vocabulary of {model.config.vocab_size}: "
            "is it the model's own tokenizer?",
        )
        stream = PerplexityByPosition(max_tokens=self.options.max_tokens, segment=self.options.segment)
        return stream.evaluate(model, documents, window=self.window(model), progress=progress)

    def table(self, results: dict) -> str:
        rows = ["| positions | perplexity | tokens |", "|---|---|---|"]
        for (start, end), ppl, count in zip(results["buckets"], results["perplexity"], results["tokens"], strict=True):
            rows.append(f"| {start}-{end} | {ppl:.3f} | {count} |" if ppl else f"| {start}-{end} | - | 0 |")
        return "\n".join(rows + [f"| all | {results['overall']:.3f} | {sum(results['tokens'])} |"])

    def card_rows(self, results: dict) -> list[dict]:
        return [
            {"setting": f"positions {start}-{end}", "metric": "perplexity", "value": ppl}
            for (start, end), ppl in zip(results["buckets"], results["perplexity"], strict=True)
            if ppl is not None
        ]

    def plot(self, results: dict, path: str, title: str = "") -> None:
        labels = ("position in document (bucket end, tokens)", "perplexity")
        with figure(path, title or self.name, *labels, log2_x=True) as axis:
            buckets = zip(results["buckets"], results["perplexity"], strict=True)
            points = [(end, ppl) for (_, end), ppl in buckets if ppl]
            axis.plot([p[0] for p in points], [p[1] for p in points], marker="o")
            axis.axvline(results["window"], color="gray", linestyle="--", label=f"window {results['window']}")
