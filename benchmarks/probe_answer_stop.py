"""Why the chat recall's replies run on: the probability that the reply stops right after the right answer.

    python benchmarks/probe_answer_stop.py MODEL_FOLDER [--windows-back 8] [--dilated]

For each of the chat recall's 10 conversations, the reply "The answer is <answer>" is teacher-forced after the
question, and the model's next-token distribution is read there: the probability of a stop (".", "!", a newline or
the end of the turn) against that of another digit. Twice: as the model is, and with every memory read gate at zero
(the windowed model, which sees the answer in its window but never read the fact). One markdown row each, means over
the conversations with a number for an answer and those with a name. --dilated: with the surprisal gate's decision
dilated by one token each side (probe_dilated_writes.py), for a model trained that way.
"""

import argparse

import torch
from probe_dilated_writes import dilated_gate_writes
from probe_memory_interference import close_memory_gates
from transformers import AutoModelForCausalLM, AutoTokenizer

import hf_llama_mem.surprisal_writes as surprisal_writes
from hf_llama_mem.evals.chat_recall import ChatRecallOptions, ChatRecallTask, encode


@torch.no_grad()
def next_token_probs(model, tokenizer, conversations) -> list[dict]:
    stops = {encode(tokenizer, text)[-1] for text in (".", "!", "\n")} | {
        tokenizer.convert_tokens_to_ids("<|im_end|>")
    }
    digits = {encode(tokenizer, str(d))[-1] for d in range(10)}
    rows = []
    for conversation in conversations:
        ids = list(conversation.input_ids) + encode(tokenizer, "The answer is " + conversation.fact.answer)
        probs = model(torch.tensor([ids]), logits_to_keep=1).logits[0, -1].float().softmax(-1)
        rows.append(
            {
                "number": conversation.fact.answer.isdigit(),
                "stop": probs[sorted(stops)].sum().item(),
                "digit": probs[sorted(digits)].sum().item(),
            }
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", help="a converted model folder (its tokenizer beside it)")
    parser.add_argument("--windows-back", type=int, default=8)
    parser.add_argument("--dilated", action="store_true", help="the surprisal gate dilated by one token each side")
    args = parser.parse_args()
    if args.dilated:
        surprisal_writes.gate_writes = dilated_gate_writes
    model = AutoModelForCausalLM.from_pretrained(args.model).eval()
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    task = ChatRecallTask(ChatRecallOptions(conversations=10, windows_back=(args.windows_back,)))
    conversations = list(task.conversations(tokenizer, model.config.sliding_window))
    results = {"as it is": next_token_probs(model, tokenizer, conversations)}
    close_memory_gates(model)
    results["memory closed (windowed)"] = next_token_probs(model, tokenizer, conversations)
    print("| model | answers | P(stop) after the answer | P(another digit) |")
    print("|---|---|---|---|")
    for way, rows in results.items():
        for kind, is_number in (("number", True), ("name", False)):
            chosen = [row for row in rows if row["number"] == is_number]
            stop = sum(row["stop"] for row in chosen) / len(chosen)
            digit = sum(row["digit"] for row in chosen) / len(chosen)
            print(f"| {way} | {kind} ({len(chosen)}) | {stop:.3f} | {digit:.3f} |")


if __name__ == "__main__":
    main()
