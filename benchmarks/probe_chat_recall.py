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
from probe_memory_interference import WriteMask, answer_loss, close_memory_gates, load

from hf_llama_mem.convert_llama import load_source_tokenizer
from hf_llama_mem.evals.chat_recall import ChatRecallOptions, ChatRecallTask, encode

WAYS = ("every write", "the fact's turn's writes only", "memory closed (windowed)")


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", help="a delta file or name, or an extend checkpoint folder")
    parser.add_argument("--windows-back", type=int, default=8)
    args = parser.parse_args()
    model, tokenizer = load(args.model), load_source_tokenizer("smollm2")
    mask = WriteMask(model)
    task = ChatRecallTask(ChatRecallOptions(conversations=10, windows_back=(args.windows_back,)))
    cases = []  # (answer kind, sample, the fact turn's end)
    for conversation in task.conversations(tokenizer, model.config.sliding_window):
        answer = encode(tokenizer, " " + conversation.fact.answer)
        ids = list(conversation.input_ids) + encode(tokenizer, "The answer is") + answer
        labels = [-100] * (len(ids) - len(answer)) + answer
        kind = "number" if conversation.fact.answer.isdigit() else "name"
        sample = {"input_ids": torch.tensor([ids]), "labels": torch.tensor([labels])}
        cases.append((kind, sample, conversation.fact_end))
    losses = [[] for _ in cases]  # per case, one loss per way
    for (_, sample, fact_end), row in zip(cases, losses, strict=True):
        row.append(answer_loss(model, sample))
        mask.keep = torch.zeros(sample["input_ids"].shape[1], dtype=torch.bool)
        mask.keep[:fact_end] = True
        row.append(answer_loss(model, sample))
        mask.keep = None
    close_memory_gates(model)
    for (_, sample, _), row in zip(cases, losses, strict=True):
        row.append(answer_loss(model, sample))
    print("| answer | conversations | " + " | ".join(f"answer loss, {way}" for way in WAYS) + " |")
    print("|---" * (len(WAYS) + 2) + "|")
    for kind in ("number", "name"):
        rows = [row for (k, *_), row in zip(cases, losses, strict=True) if k == kind]
        means = [sum(r[i] for r in rows) / len(rows) for i in range(len(WAYS))]
        print(f"| {kind} | {len(rows)} | " + " | ".join(f"{m:.2f}" for m in means) + " |")


if __name__ == "__main__":
    main()
