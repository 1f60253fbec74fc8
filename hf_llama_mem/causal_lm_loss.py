"""The causal-LM loss of LlamaMemForCausalLM: transformers' ForCausalLMLoss, computed in row blocks.

Same contract and value as `transformers.loss.loss_utils.ForCausalLMLoss` (labels shifted left, `ignore_index` rows
skipped, the mean over counted rows, or the sum over `num_items_in_batch` when Trainer passes it), in float32; a batch
whose labels are all `ignore_index` gives the same nan (0 / 0) and the same exactly-zero gradients. The
stock loss runs `log_softmax` over all of the [tokens, vocab] logits, keeps that second full-size tensor for its
backward, and builds the logits' gradient from a zero-filled third one; at 8K tokens and a 32K vocabulary each is
1 GB. Here the forward keeps only one log-sum-exp per row, and both passes work through the logits in row blocks
small enough to stay in cache and be reused by the allocator. On the CPU that makes the loss of an 8K-token step
several times cheaper; the benchmark reports Llama's training with this same loss alongside, so that this part of
the speed-up is not credited to the architecture.
"""

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

__all__ = ["causal_lm_loss"]

# Elements per row block (8 MB in float32): blocks stay in the allocator's reused heap and in the last-level cache.
BLOCK_ELEMENTS = 2**21


def causal_lm_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    vocab_size: int,
    num_items_in_batch: torch.Tensor | int | None = None,
    ignore_index: int = -100,
    shift_labels: torch.Tensor | None = None,
    **kwargs,
) -> torch.Tensor:
    """logits [..., vocab_size]; labels aligned with the inputs (shifted here) unless `shift_labels` is given."""
    if shift_labels is None:
        shift_labels = F.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    logits = logits.reshape(-1, vocab_size)
    targets = shift_labels.reshape(-1).to(logits.device)
    counted = targets != ignore_index
    out_of_range = counted & ((targets < 0) | (targets >= vocab_size))
    # Not under torch.compile: a branch on a tensor's value would split the graph (and host-sync every step).
    if not torch.compiler.is_compiling() and out_of_range.any():
        bad = targets[out_of_range][0].item()
        raise ValueError(f"label {bad} is outside the vocabulary [0, {vocab_size}) and is not ignore_index.")
    total = _SummedCrossEntropy.apply(logits, targets.masked_fill(~counted, 0), counted)
    if num_items_in_batch is None:
        return total / counted.sum()  # 0 / 0 = nan when nothing counts, as the stock mean (its gradients are zeros)
    if torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(total.device)
    return total / num_items_in_batch


class _SummedCrossEntropy(torch.autograd.Function):
    """sum over counted rows of logsumexp(logits_row) - logits_row[target], in float32."""

    @staticmethod
    def forward(ctx, logits, targets, counted):
        rows = _block_rows(logits)
        log_norms = torch.empty(logits.shape[0], dtype=torch.float32, device=logits.device)
        for start in range(0, logits.shape[0], rows):
            log_norms[start : start + rows] = torch.logsumexp(logits[start : start + rows].float(), dim=-1)
        picked = logits.gather(1, targets[:, None])[:, 0].float()
        ctx.save_for_backward(logits, targets, counted, log_norms)
        # masked, not multiplied: a row that does not count adds exactly 0 whatever its logits hold
        return (log_norms - picked).masked_fill_(~counted, 0.0).sum()

    @staticmethod
    @once_differentiable
    def backward(ctx, total_grad):
        logits, targets, counted, log_norms = ctx.saved_tensors
        # d total / d logits = counted * (softmax(logits) - onehot(target)). When nothing counts the loss is 0 / 0 and
        # its upstream gradient inf: selecting (not multiplying by counted, inf * 0 = nan) gives the rows that do not
        # count an exact zero gradient, as transformers' cross_entropy with ignore_index does.
        row_scale = torch.where(counted, total_grad, total_grad.new_zeros(()))
        grad = torch.empty_like(logits)
        rows = _block_rows(logits)
        for start in range(0, logits.shape[0], rows):
            block = slice(start, start + rows)
            grad[block] = (logits[block].float() - log_norms[block, None]).exp_().mul_(row_scale[block, None])
        grad.scatter_add_(1, targets[:, None], -row_scale[:, None].to(grad.dtype))
        return grad, None, None


def _block_rows(logits: torch.Tensor) -> int:
    return max(1, BLOCK_ELEMENTS // max(1, logits.shape[-1]))
