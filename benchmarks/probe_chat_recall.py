"""Does the memory hold the chat recall's fact, apart from how the reply is generated? Probes a trained SmolLM2 memory.

    python benchmarks/probe_chat_recall.py DELTA_OR_CHECKPOINT [--windows-back 8]

DELTA_OR_CHECKPOINT as in probe_memory_interference.py. For each of the chat recall evaluation's 10 conversations,
the reply "The answer is <answer>" is scored teacher-forced (cross-entropy per answer token) three ways: with every
write; with only the writes of the turns up to the fact's (what the read can do when nothing overwrites the fact);
and with the memory's read gates closed (the windowed model). One markdown row per answer kind (number or name),
each the mean over its conversations.
"""

import argparse

import torch
import torch.nn.functional as F
from probe_memory_interference import WriteMask, close_memory_gates, load

from hf_llama_mem.convert_llama import load_source_tokenizer
from hf_llama_mem.evals.chat_recall import ChatRecallOptions, ChatRecallTask, encode

WAYS = ("every write", "the fact's turn's writes only", "memory closed (windowed)")


def answer_loss(model, ids: torch.Tensor, labels: torch.Tensor) -> float:
    logits = model(input_ids=ids, use_cache=False).logits[0, :-1].float()
    return F.cross_entropy(logits, labels[0, 1:], ignore_index=-100).item()


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", help="a delta file or name, or an extend checkpoint folder")
    parser.add_argument("--windows-back", type=int, default=8)
    args = parser.parse_args()
    model, tokenizer = load(args.model), load_source_tokenizer("smollm2")
    mask = WriteMask(model)
    task = ChatRecallTask(ChatRecallOptions(conversations=10, windows_back=(args.windows_back,)))
    cases = []  # (answer kind, input ids, labels, the fact turn's end)
    for conversation in task.conversations(tokenizer, model.config.sliding_window):
        answer = encode(tokenizer, " " + conversation.fact.answer)
        ids = list(conversation.input_ids) + encode(tokenizer, "The answer is") + answer
        labels = [-100] * (len(ids) - len(answer)) + answer
        kind = "number" if conversation.fact.answer.isdigit() else "name"
        cases.append((kind, torch.tensor([ids]), torch.tensor([labels]), conversation.fact_end))
    losses = [[] for _ in cases]  # per case, one loss per way
    for (_, ids, labels, fact_end), row in zip(cases, losses, strict=True):
        row.append(answer_loss(model, ids, labels))
        mask.keep = torch.zeros(ids.shape[1], dtype=torch.bool)
        mask.keep[:fact_end] = True
        row.append(answer_loss(model, ids, labels))
        mask.keep = None
    close_memory_gates(model)
    for (_, ids, labels, _), row in zip(cases, losses, strict=True):
        row.append(answer_loss(model, ids, labels))
    print("| answer | conversations | " + " | ".join(f"answer loss, {way}" for way in WAYS) + " |")
    print("|---" * (len(WAYS) + 2) + "|")
    for kind in ("number", "name"):
        rows = [row for (k, *_), row in zip(cases, losses, strict=True) if k == kind]
        means = [sum(r[i] for r in rows) / len(rows) for i in range(len(WAYS))]
        print(f"| {kind} | {len(rows)} | " + " | ".join(f"{m:.2f}" for m in means) + " |")


if __name__ == "__main__":
    main()
