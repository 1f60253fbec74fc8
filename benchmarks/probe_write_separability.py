"""Can a memory layer's write gate tell a needle from the filler at all? A linear probe per layer (SmolLM2).

    python benchmarks/probe_write_separability.py [DELTA_OR_CHECKPOINT] [--samples 12] [--length 1024]

The write strength of a token is sigmoid(w . h + b), h the hidden state its memory layer writes from: a linear
function of h. This fits, per memory layer, the best such function (logistic regression, classes weighted equally)
to tell the statement tokens of the recipe's own training samples (`statement_mask`: passkeys and multi-needle, the
Python documentation's training split) from their filler, then scores it on what it never saw: the passkey
evaluation's own format (held-out templates and filler, seed 1, depths 0 and 0.5), the needle's digits against the
filler. One markdown row per layer: the area under the ROC curve on the training samples and on the held-out needle,
and the held-out margin a gate would need: how far (in logits) the needle's lowest-scoring digit lies above the 99.9th
percentile of the filler. An AUC near 1 with a positive margin means the gate could learn to write the needle and
skip the filler; near 0.5, no write gate of this form can. First, the same two scores for a signal no gate has to
learn: each token's surprisal under the windowed model.
"""

import argparse
import random

import torch
from probe_memory_interference import load, needle_digits, needle_span, surprisal

from hf_llama_mem.convert_llama import load_source_tokenizer
from hf_llama_mem.evals.common import seeded_generator
from hf_llama_mem.evals.passkey import PasskeyOptions, PasskeyTask
from hf_llama_mem.long_context_data import LongContextData, NaturalText, sample_seed


def write_inputs(model, input_ids: torch.LongTensor) -> list[torch.Tensor]:
    """Per memory layer, the hidden states its write projection reads, [T', hidden] (the tokens leaving the window)."""
    found = []
    hooks = [
        module.register_forward_hook(lambda m, args, out: found.append(args[0][0].float()))
        for name, module in model.named_modules()
        if name.endswith("memory.write_proj")
    ]
    model(input_ids=input_ids, use_cache=False)
    for hook in hooks:
        hook.remove()
    return found


def auc(positive: torch.Tensor, negative: torch.Tensor) -> float:
    """P(score of a positive > score of a negative), ties counting half."""
    scores = torch.cat([positive, negative])
    ranks = scores.argsort().argsort().double() + 1
    n_pos, n_neg = len(positive), len(negative)
    return ((ranks[:n_pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)).item()


def fit(features: torch.Tensor, labels: torch.Tensor, steps: int = 300) -> tuple[torch.Tensor, torch.Tensor]:
    """Logistic regression on standardised features, both classes weighing the same: (weight, bias) on raw h."""
    mean, std = features.mean(0), features.std(0).clamp_min(1e-6)
    x = (features - mean) / std
    w = torch.zeros(x.shape[1], requires_grad=True)
    b = torch.zeros((), requires_grad=True)
    weight = torch.where(labels, 0.5 / labels.sum(), 0.5 / (~labels).sum())
    optimizer = torch.optim.Adam([w, b], lr=0.05)
    for _ in range(steps):
        loss = torch.nn.functional.binary_cross_entropy_with_logits(x @ w + b, labels.float(), reduction="none")
        loss = (loss * weight).sum() + 1e-4 * w.square().sum()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    w, b = w.detach() / std, b.detach() - (w.detach() / std * mean).sum()
    return w, b


@torch.no_grad()
def held_out_needles(model, tokenizer, length: int) -> list[tuple[list[torch.Tensor], slice]]:
    task = PasskeyTask(PasskeyOptions(lengths=(length,), depths=(0.0, 0.5), samples=1))
    fmt, generator = task.format_for(tokenizer), seeded_generator(1)
    out = []
    for depth in (0.0, 0.5):
        sample = task.build(fmt, length, depth, generator)
        inputs = write_inputs(model, sample["input_ids"])
        written = inputs[0].shape[0]  # the tokens that leave the window: what a write gate decides on
        nll = surprisal(model, sample["input_ids"])[:written]
        out.append((inputs, needle_digits(sample), needle_span(sample), nll))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", nargs="?", default="smollm2-135m-instruct", help="a delta file or name")
    parser.add_argument("--samples", type=int, default=12, help="training-format samples to fit on")
    parser.add_argument("--length", type=int, default=1024)
    args = parser.parse_args()
    torch.manual_seed(0)
    model, tokenizer = load(args.model), load_source_tokenizer("smollm2")
    data = LongContextData(tokenizer, NaturalText.for_split(tokenizer, "train"), min_gap=model.config.sliding_window)
    per_layer, labels, surprisals = None, [], []
    with torch.no_grad():
        for i in range(args.samples):
            rng = random.Random(sample_seed(0, "separability", i))
            sample = data.generate(("passkey", "multi_needle")[i % 2], args.length, rng)
            inputs = write_inputs(model, torch.tensor([sample["input_ids"]]))
            per_layer = [[] for _ in inputs] if per_layer is None else per_layer
            for store, h in zip(per_layer, inputs, strict=True):
                store.append(h)
            labels.append(torch.tensor(sample["statement_mask"][: inputs[0].shape[0]], dtype=torch.bool))
            surprisals.append(surprisal(model, torch.tensor([sample["input_ids"]]))[: inputs[0].shape[0]])
    labels, surprisals = torch.cat(labels), torch.cat(surprisals)
    held_out = held_out_needles(model, tokenizer, args.length)
    # A signal no gate has to learn: the token's own surprisal, scored the same two ways.
    needle, filler = [], []
    for _, digits, (start, end), nll in held_out:
        keep = torch.ones(len(nll), dtype=torch.bool)
        keep[start:end] = False
        needle.append(nll[digits])
        filler.append(nll[keep])
    needle, filler = torch.cat(needle), torch.cat(filler)
    print(
        f"surprisal (windowed model): AUC {auc(surprisals[labels], surprisals[~labels]):.3f} on the training format, "
        f"{auc(needle, filler):.3f} on the held-out needle's digits; held-out margin "
        f"{(needle.min() - filler.quantile(0.999)).item():+.2f} nats"
    )
    print(f"{labels.sum().item()} statement and {(~labels).sum().item()} filler tokens to fit on")
    print("| layer | AUC, training format | AUC, held-out needle digits | held-out margin (logits) |")
    print("|---|---|---|---|")
    for layer, stored in enumerate(per_layer):
        features = torch.cat(stored)
        w, b = fit(features, labels)
        scores = features @ w + b
        train_auc = auc(scores[labels], scores[~labels])
        needle, filler = [], []
        for inputs, digits, (start, end), _ in held_out:
            s = inputs[layer] @ w + b
            keep = torch.ones(len(s), dtype=torch.bool)
            keep[start:end] = False
            needle.append(s[digits])
            filler.append(s[keep])
        needle, filler = torch.cat(needle), torch.cat(filler)
        margin = needle.min() - filler.quantile(0.999)
        print(f"| {layer} | {train_auc:.3f} | {auc(needle, filler):.3f} | {margin.item():+.2f} |")


if __name__ == "__main__":
    main()
