"""Perplexity by position on long documents, computed as a stream through the model's cache.

Each document is read in segments of `segment` tokens, each segment one forward that continues the cache, so memory
stays constant for LlamaMem however long the document is (for a model whose cache grows, such as full-attention
Llama, it grows as usual). Token losses are summed into position buckets: [0, W), [W, 2W), [2W, 4W), ... for a
window W. Lower perplexity in the far buckets for a memory model than for its no-memory twin is the evidence that
tokens long gone from the window still help.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers import DynamicCache

from ..modeling_llama_mem import CACHE_FIELD


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
