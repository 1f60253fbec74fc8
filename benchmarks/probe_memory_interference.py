"""What loses a passkey stored more than W back: the read, or the writes after it? Probes a trained SmolLM2 memory.

    python benchmarks/probe_memory_interference.py DELTA_OR_CHECKPOINT [--lengths 1024,2048,4096] [--samples 2]

DELTA_OR_CHECKPOINT: a delta file (`extend`'s memory_delta.safetensors, or the shipped smollm2-135m-instruct) or an
`extend` checkpoint folder (its run's settings.json gives the conversion). For each length, the passkey evaluation's
samples (seed 1, depths 0 and 0.5) are scored three ways, each a markdown row:

- answer loss per token with every write, and with only the needle's writes (every other token's write strength
  forced to zero: what the read can do when nothing overwrites the needle);
- exact match of the teacher-forced answer (as `hf-llama-mem eval passkey`), per depth;
- at the first length, on one sample: the geometry of the memory keys, mean |cosine| among filler tokens and between
  needle and filler tokens (a delta-rule write erases what is stored along its key, so keys with cosine c interfere
  by c^2), and the mean write strength (beta) of the needle's digits and of the filler: a memory that writes
  selectively has the first near 1 and the second near 0. Each averaged over layers and heads;
- with --surprise-above T1,T2,...: per T, the answer loss and exact matches (of the samples at that length) with only
  the writes of tokens whose surprisal under the windowed model exceeds T, the rest forced to zero: a write strength
  driven by surprise, tried without training.
"""

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from hf_llama_mem import LlamaMemForCausalLM
from hf_llama_mem.convert_llama import load_source_tokenizer, resolve_delta
from hf_llama_mem.evals.common import seeded_generator
from hf_llama_mem.evals.passkey import PasskeyOptions, PasskeyTask
from hf_llama_mem.extend import ExtendSettings, apply_delta, delta_conversion, load_model

DEPTHS = (0.0, 0.5)
NEEDLE_MARGIN = (16, 4)  # tokens before and after the key's digits that count as the needle sentence


def load(path: str) -> LlamaMemForCausalLM:
    folder = Path(path)
    if folder.is_dir():  # an extend checkpoint: checkpoints/step-N/trained.safetensors, settings two levels up
        settings = json.loads((folder.parent.parent / "settings.json").read_text())
        model = load_model("smollm2", ExtendSettings(**{**settings, "progress": False}))
        params = dict(model.named_parameters())
        with torch.no_grad():
            for name, tensor in load_file(folder / "trained.safetensors").items():
                params[name].copy_(tensor)
        return model.eval()
    delta = resolve_delta(path)
    # Every write, whatever threshold the delta records: the probe gates the writes itself (WriteMask).
    conversion = {**delta_conversion(delta), "memory_write_surprisal_threshold": None}
    return apply_delta(LlamaMemForCausalLM.from_llama("smollm2", **conversion).float(), delta).eval()


def close_memory_gates(model) -> dict[str, torch.Tensor]:
    """Zero every memory read gate: the windowed model the memory was converted from, exactly. Returns the gates'
    values before, by parameter name."""
    opened = {}
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith((".memory.gate", ".memory.token_gate")):
                opened[name] = param.clone()
                param.zero_()
    return opened


class WriteMask:
    """Forces the write strength of every token outside `keep` to zero (the write projection's logit to -1e4)."""

    def __init__(self, model):
        self.keep = None
        for name, module in model.named_modules():
            if name.endswith("memory.write_proj"):
                module.register_forward_hook(self.hook)

    def hook(self, module, args, output):
        if self.keep is None:
            return output
        keep = self.keep[: output.shape[1]]  # without a cache only the tokens leaving the window write
        return torch.where(keep[None, :, None], output, torch.full_like(output, -1e4))


def needle_digits(sample) -> slice:
    """Where the key's digits first stand in the sample (the needle; the answer repeats them at the end)."""
    ids, labels = sample["input_ids"][0].tolist(), sample["labels"][0]
    answer = sample["input_ids"][0][labels != -100].tolist()
    start = next(i for i in range(len(ids)) if ids[i : i + len(answer)] == answer)
    return slice(start, start + len(answer))


def needle_span(sample) -> tuple[int, int]:
    """The needle sentence: the digits and NEEDLE_MARGIN tokens around them."""
    digits = needle_digits(sample)
    return max(0, digits.start - NEEDLE_MARGIN[0]), digits.stop + NEEDLE_MARGIN[1]


def surprisal(model, input_ids: torch.LongTensor) -> torch.Tensor:
    """Each token's -log p(token | what precedes it) under the windowed model (the memory gates closed), [T]; the
    first token gets 0. Known when the token is read, W tokens before it leaves the window and writes."""
    opened = close_memory_gates(model)
    logits = model(input_ids=input_ids, use_cache=False).logits[0, :-1].float()
    params = dict(model.named_parameters())
    for name, value in opened.items():
        params[name].copy_(value)
    nll = F.cross_entropy(logits, input_ids[0, 1:], reduction="none")
    return torch.cat([nll.new_zeros(1), nll])


def answer_loss(model, sample) -> float:
    return answer_loss_and_exact(model, sample)[0]


def answer_loss_and_exact(model, sample) -> tuple[float, bool]:
    """The teacher-forced answer's loss per token, and whether greedy decoding gets every answer token right."""
    logits = model(input_ids=sample["input_ids"], use_cache=False).logits[0, :-1]
    labels = sample["labels"][0, 1:]
    counted = labels != -100
    exact = bool((logits[counted].argmax(-1) == labels[counted]).all())
    return F.cross_entropy(logits, labels, ignore_index=-100).item(), exact


def write_geometry(model, sample) -> dict[str, float]:
    """Mean |cosine| of the memory keys (filler-filler, needle-filler) and mean write strength (the needle's digits,
    the filler), over layers and heads."""
    entries, head_dim = {}, model.config.head_dim
    hooks = [
        module.register_forward_hook(
            lambda m, args, out, name=name: entries.__setitem__(name, out[0]) if args[0] == "write" else None
        )
        for name, module in model.named_modules()
        if name.endswith("self_attn.memory")
    ]
    model(input_ids=sample["input_ids"], use_cache=False)
    for hook in hooks:
        hook.remove()
    start, end = needle_span(sample)
    digits = needle_digits(sample)
    found = {"filler_filler": [], "needle_filler": [], "needle_beta": [], "filler_beta": []}
    for layer_entries in entries.values():
        for head in layer_entries:  # [T', 2D + 2]: value, unit key, g, beta
            keys, beta = head[:, head_dim : 2 * head_dim], head[:, -1]
            filler, filler_beta = torch.cat([keys[:start], keys[end:]]), torch.cat([beta[:start], beta[end:]])
            found["filler_filler"].append((filler @ filler.T).abs().mean().item())
            found["needle_filler"].append((keys[digits] @ filler.T).abs().mean().item())
            found["needle_beta"].append(beta[digits].mean().item())
            found["filler_beta"].append(filler_beta.mean().item())
    return {name: sum(values) / len(values) for name, values in found.items()}


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", help="a delta file or name, or an extend checkpoint folder")
    parser.add_argument("--lengths", default="1024,2048,4096")
    parser.add_argument("--samples", type=int, default=2, help="samples per length and depth")
    parser.add_argument(
        "--surprise-above",
        default="",
        help="thresholds T (nats), e.g. 4,6: a column per T with only the writes of tokens whose surprisal under the "
        "windowed model exceeds T (a write strength driven by surprise, without training)",
    )
    args = parser.parse_args()
    thresholds = [float(x) for x in args.surprise_above.split(",") if x]
    model, tokenizer = load(args.model), load_source_tokenizer("smollm2")
    mask = WriteMask(model)
    surprise_columns = "".join(f" writes where surprisal > {t:g}: loss (exact) |" for t in thresholds)
    print(
        "| length | answer loss, all writes | answer loss, needle's writes only | exact match at depths 0 / 0.5 |"
        + surprise_columns
    )
    print("|---|---|---|---|" + "---|" * len(thresholds))
    for index, length in enumerate(int(x) for x in args.lengths.split(",")):
        task = PasskeyTask(PasskeyOptions(lengths=(length,), depths=DEPTHS, samples=args.samples))
        fmt, generator, losses = task.format_for(tokenizer), seeded_generator(1), {"all": [], "needle": []}
        gated = {t: [] for t in thresholds}
        samples = [task.build(fmt, length, d, generator) for d in DEPTHS for _ in range(args.samples)]
        if index == 0:
            geometry = write_geometry(model, samples[-1])
        for sample in samples:
            losses["all"].append(answer_loss(model, sample))
            start, end = needle_span(sample)
            mask.keep = torch.zeros(sample["input_ids"].shape[1], dtype=torch.bool)
            mask.keep[start:end] = True
            losses["needle"].append(answer_loss(model, sample))
            mask.keep = None
            if thresholds:
                nll = surprisal(model, sample["input_ids"])
                for threshold in thresholds:
                    mask.keep = nll > threshold
                    gated[threshold].append(answer_loss_and_exact(model, sample))
                mask.keep = None
        exact = task.evaluate(model, tokenizer, seed=1, progress=False)["grid"][0]
        mean = {kind: sum(v) / len(v) for kind, v in losses.items()}
        cells = " / ".join(f"{e:g}" for e in exact)
        surprise_cells = ""
        for threshold in thresholds:
            scores = gated[threshold]
            mean_loss, exact_count = sum(s[0] for s in scores) / len(scores), sum(s[1] for s in scores)
            surprise_cells += f" {mean_loss:.2f} ({exact_count}/{len(scores)}) |"
        print(f"| {length} | {mean['all']:.2f} | {mean['needle']:.2f} | {cells} |{surprise_cells}", flush=True)
    print(
        f"\nmemory keys at {args.lengths.split(',')[0]} tokens: mean |cos| filler-filler "
        f"{geometry['filler_filler']:.2f}, needle-filler {geometry['needle_filler']:.2f}; "
        f"mean write strength: the needle's digits {geometry['needle_beta']:.4f}, "
        f"the filler {geometry['filler_beta']:.4f}"
    )


if __name__ == "__main__":
    main()
