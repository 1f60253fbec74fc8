"""Tables (markdown, for the terminal and the README), model-card rows and plots of evaluation results."""


def format_results(results: dict) -> str:
    task = results["task"]
    if task == "passkey":
        header = "| length \\ depth | " + " | ".join(f"{d:g}" for d in results["depths"]) + " | mean |"
        rows = [header, "|---" * (len(results["depths"]) + 2) + "|"]
        for length, row in zip(results["lengths"], results["grid"], strict=True):
            mean = results["by_length"][str(length)]
            rows.append(f"| {length} | " + " | ".join(f"{v:.2f}" for v in row) + f" | {mean:.2f} |")
        return "\n".join(rows)
    if task == "recall":
        rows = ["| distance (gap) | accuracy |", "|---|---|"]
        rows += [f"| {gap} | {acc:.3f} |" for gap, acc in results["by_distance"].items()]
        return "\n".join(rows + [f"| chance | {results['chance']:.3f} |"])
    if task == "perplexity":
        rows = ["| positions | perplexity | tokens |", "|---|---|---|"]
        for (start, end), ppl, count in zip(results["buckets"], results["perplexity"], results["tokens"], strict=True):
            rows.append(f"| {start}-{end} | {ppl:.3f} | {count} |" if ppl else f"| {start}-{end} | - | 0 |")
        return "\n".join(rows + [f"| all | {results['overall']:.3f} | {sum(results['tokens'])} |"])
    raise ValueError(f"Unknown task {task!r}.")


def card_entries(results: dict) -> list[dict]:
    """The rows the model card's evaluation table shows for these results."""
    task = results["task"]
    if task == "passkey":
        return [
            {"setting": f"length {length}", "metric": "accuracy", "value": acc}
            for length, acc in results["by_length"].items()
        ]
    if task == "recall":
        return [
            {"setting": f"distance {gap}", "metric": "accuracy", "value": acc}
            for gap, acc in results["by_distance"].items()
        ]
    return [
        {"setting": f"positions {start}-{end}", "metric": "perplexity", "value": ppl}
        for (start, end), ppl in zip(results["buckets"], results["perplexity"], strict=True)
        if ppl is not None
    ]


def plot_results(results: dict, path: str, title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 4))
    task = results["task"]
    if task == "passkey":
        for depth_index, depth in enumerate(results["depths"]):
            values = [row[depth_index] for row in results["grid"]]
            axis.plot(results["lengths"], values, marker="o", label=f"depth {depth:g}")
        axis.set_xscale("log", base=2)
        axis.set(xlabel="context length (tokens)", ylabel="passkey accuracy", ylim=(-0.05, 1.05))
        axis.legend()
    elif task == "recall":
        gaps = [int(g) for g in results["by_distance"]]
        axis.plot(gaps, list(results["by_distance"].values()), marker="o", label="accuracy")
        axis.axhline(results["chance"], color="gray", linestyle="--", label="chance")
        axis.set_xscale("log", base=2)
        axis.set(xlabel="distance from pair to query (tokens)", ylabel="recall accuracy", ylim=(-0.05, 1.05))
        axis.legend()
    else:
        points = [(end, ppl) for (_, end), ppl in zip(results["buckets"], results["perplexity"], strict=True) if ppl]
        axis.plot([p[0] for p in points], [p[1] for p in points], marker="o")
        axis.axvline(results["window"], color="gray", linestyle="--", label=f"window {results['window']}")
        axis.set_xscale("log", base=2)
        axis.set(xlabel="position in document (bucket end, tokens)", ylabel="perplexity")
        axis.legend()
    axis.set_title(title or task)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
