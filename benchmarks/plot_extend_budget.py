"""The budget-vs-result curve of `hf-llama-mem extend`: held-out answer loss and exact match by training time, from
the log.jsonl of each stage in order (a second stage, `--init-delta`, continues the first's clock).

    python benchmarks/plot_extend_budget.py docs/extend_budget_smollm2.png run/log.jsonl stage2/log.jsonl

Prints a markdown table (minutes, steps, held-out answer loss, exact match, language-modelling loss where a stage
trains it) and draws the two curves. The minutes are the
steps' own seconds as logged (training only: the held-out evaluations are not counted).
"""

import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def retrieval_loss(by_kind: dict) -> float:
    losses = [loss for kind, loss in by_kind.items() if kind != "language_modelling"]
    return sum(losses) / len(losses)


def budget_points(log_paths: list[str]) -> list[dict]:
    points, seconds, steps = [], 0.0, 0
    for stage, path in enumerate(log_paths, start=1):
        with open(path) as handle:
            records = [json.loads(line) for line in handle if line.strip()]
        for record in records:
            if "loss" in record:
                seconds += record["seconds"]
                steps += 1
            elif "eval_loss" in record and not (stage > 1 and record["step"] == 0):
                points.append(
                    {
                        "stage": stage,
                        "steps": steps,
                        "minutes": seconds / 60,
                        # the retrieval kinds' loss; a stage with language modelling reports that loss beside it
                        "eval_loss": retrieval_loss(record["eval_loss_by_kind"]),
                        "lm_loss": record["eval_loss_by_kind"].get("language_modelling"),
                        "exact_match": record["eval_answer_accuracy"],
                    }
                )
    return points


def main(output: str, *log_paths: str) -> None:
    points = budget_points(list(log_paths))
    print("| minutes | steps | stage | held-out answer loss | exact match | held-out LM loss |")
    print("|---|---|---|---|---|---|")
    for p in points:
        lm = "-" if p["lm_loss"] is None else f"{p['lm_loss']:.2f}"
        cells = [f"{p['minutes']:.0f}", str(p["steps"]), str(p["stage"]), f"{p['eval_loss']:.2f}"]
        print("| " + " | ".join([*cells, f"{p['exact_match']:.2f}", lm]) + " |")
    figure, (loss_axis, match_axis) = plt.subplots(1, 2, figsize=(9, 3.5))
    minutes = [p["minutes"] for p in points]
    loss_axis.plot(minutes, [p["eval_loss"] for p in points], marker="o")
    loss_axis.set_ylabel("held-out answer loss (per token)")
    match_axis.plot(minutes, [p["exact_match"] for p in points], marker="o")
    match_axis.set_ylabel("held-out exact match")
    match_axis.set_ylim(-0.05, 1.05)
    for axis in (loss_axis, match_axis):
        axis.set_xlabel("training minutes (this CPU, as logged)")
        axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(output, dpi=110)


if __name__ == "__main__":
    main(*sys.argv[1:])
