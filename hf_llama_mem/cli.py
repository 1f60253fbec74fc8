"""The `hf-llama-mem` console script: each subcommand parses its arguments and calls library functions."""

import argparse
import json
import os
import sys


def convert(args: argparse.Namespace) -> None:
    from .convert_llama import load_source, verify_conversion
    from .model_card import write_model_card
    from .modeling_llama_mem import LlamaMemForCausalLM

    overrides = {"sliding_window": args.sliding_window, "memory_rule": args.memory_rule}
    if args.memory_layers is not None:
        overrides["memory_layers"] = [int(i) for i in args.memory_layers.split(",") if i]
    source = load_source(args.src)
    model = LlamaMemForCausalLM.from_llama(source, **{k: v for k, v in overrides.items() if v is not None})
    report = verify_conversion(source, model, num_sequences=args.check_sequences)
    model.save_pretrained(args.dst)  # writes the model card too
    if not os.path.isdir(args.src):
        # A hub id names the base model in the card's metadata (a local folder means nothing on the Hub).
        write_model_card(model.config, args.dst, base_model=args.src)
    summary = {
        "source": args.src,
        "destination": args.dst,
        "sliding_window": model.config.sliding_window,
        "memory_rule": model.config.memory_rule,
        "memory_layers": model.config.memory_layers,
        "parameters": sum(p.numel() for p in model.parameters()),
        "new_memory_parameters": sum(p.numel() for p in model.memory_parameters()),
        **report,
    }
    print(json.dumps(summary, indent=2))


def generate(args: argparse.Namespace) -> None:
    from .evals.run import load_model_and_tokenizer
    from .memory_state import generate_with_memory, load_memory, save_memory

    model, tokenizer = load_model_and_tokenizer(args.model)
    cache = load_memory(args.load_memory, model) if args.load_memory else None
    prompt = tokenizer(args.prompt, return_tensors="pt", add_special_tokens=cache is None).input_ids
    new_tokens, cache = generate_with_memory(
        model,
        prompt,
        cache,
        max_new_tokens=args.max_new_tokens,
        do_sample=args.temperature > 0,
        temperature=args.temperature or None,
    )
    print(tokenizer.decode(new_tokens[0], skip_special_tokens=True))
    if args.save_memory:
        save_memory(cache, args.save_memory, model)


def evaluate(args: argparse.Namespace) -> None:
    from .evals.run import format_results, run_eval

    results = run_eval(args.task, args.model, args)
    print(format_results(results))
    print(f"results: {args.output_dir}/{args.task}.json, plot: {args.output_dir}/{args.task}.png")


def int_list(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def float_list(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x]


def bench(args: argparse.Namespace) -> None:
    from .bench import FULL, QUICK, run_benchmark, write_results

    lines = []

    def report(line: str) -> None:
        lines.append(line)
        print(line, flush=True)

    results = run_benchmark(QUICK if args.quick else FULL, report)
    write_results(results, args.json, lines)
    print(f"results: {args.json} and {os.path.splitext(args.json)[0]}.md")


def demo(args: argparse.Namespace) -> None:
    from transformers.utils import logging

    from .demo import DemoSettings, format_table, run_demo

    logging.set_verbosity_info() if args.verbose else logging.set_verbosity_warning()
    results = run_demo(args.output_dir, DemoSettings(steps=args.steps, seed=args.seed))
    print(format_table(results))
    print(f"results, plot (recall.png) and the trained memory model are in {args.output_dir}/")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hf-llama-mem", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    p = commands.add_parser(
        "demo", help="train memory vs no-memory on recall beyond the window, compare (CPU, minutes)"
    )
    p.add_argument("--output-dir", default="demo_output")
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--verbose", action="store_true", help="log the memory probe (gates, read norms) while training")
    p.set_defaults(run=demo)

    p = commands.add_parser("eval", help="long-context evaluation: passkey, recall or perplexity by position")
    p.add_argument("task", choices=["passkey", "recall", "perplexity"])
    p.add_argument("--model", required=True, help="model folder (any causal LM for perplexity and passkey)")
    p.add_argument("--output-dir", default="eval_output")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-record", dest="record", action="store_false", help="leave the model card alone")
    p.add_argument("--lengths", type=int_list, default=[256, 1024, 4096], help="passkey context lengths")
    p.add_argument("--depths", type=float_list, default=[0.0, 0.25, 0.5, 0.75, 1.0], help="passkey depths")
    p.add_argument("--samples", type=int, default=8, help="passkey samples per length and depth")
    p.add_argument(
        "--format", choices=["text", "recall-tokens"], default="text", help="passkey as text, or in recall ids"
    )
    p.add_argument("--gaps", type=int_list, default=[64, 128, 256, 512, 1024], help="recall distances")
    p.add_argument("--sequences", type=int, default=256, help="recall sequences per distance")
    p.add_argument("--files", nargs="*", help="perplexity documents (default: held-out stdlib sources)")
    p.add_argument("--max-tokens", type=int, default=8192, help="perplexity: tokens read per document")
    p.add_argument("--segment", type=int, default=1024, help="perplexity: tokens per forward through the cache")
    p.add_argument("--window", type=int, default=1024, help="perplexity buckets for models without a window")
    p.set_defaults(run=evaluate)

    p = commands.add_parser("bench", help="speed, cache and memory vs transformers' LlamaForCausalLM (CPU, fp32)")
    p.add_argument("--quick", action="store_true", help="smaller model and lengths (minutes, not tens of minutes)")
    p.add_argument("--json", default="bench_vs_llama.json", help="results file (a .md table is written beside it)")
    p.set_defaults(run=bench)

    p = commands.add_parser("convert", help="convert a Llama/Mistral checkpoint into LlamaMem and verify it")
    p.add_argument("src", help="source model: local folder or hub id")
    p.add_argument("dst", help="folder to save the converted model in")
    p.add_argument("--sliding-window", type=int, help="W; defaults to the source's window, else 4096")
    p.add_argument("--memory-rule", choices=["gated_delta", "delta"])
    p.add_argument("--memory-layers", help="comma-separated layer indices (default: every layer)")
    p.add_argument("--check-sequences", type=int, default=3, help="random sequences to verify the conversion on")
    p.set_defaults(run=convert)

    p = commands.add_parser("generate", help="generate from a saved model, optionally continuing a saved memory")
    p.add_argument("--model", required=True)
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--load-memory", help="memory file written by --save-memory to continue from")
    p.add_argument("--save-memory", help="write the memory after generating to this file")
    p.set_defaults(run=generate)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    args.run(args)


if __name__ == "__main__":
    main(sys.argv[1:])
