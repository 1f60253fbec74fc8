"""RULER (lm-evaluation-harness's long-context tasks) on our models, offline: `run_ruler` and `RulerTask`.

lm-evaluation-harness (`pip install "hf-llama-mem[ruler]"`: lm_eval 0.4.13, nltk, wonderwords, scipy) ships the 13
RULER tasks as generators: each builds its samples for the requested lengths with the model's tokenizer, the model
answers by greedy generation, and a sample scores the fraction of expected strings found in the answer (RULER's
string match; qa tasks: any one). Nothing of RULER is copied here: this module calls lm_eval's Python API
(`lm_eval.simple_evaluate` with an `HFLM` over the model) and reads its results.

Which tasks run offline (`OFFLINE_TASKS`; the haystack each uses is in `RULER_TASKS`):
- niah_single_1 (repeated sentences), niah_multikey_2 and niah_multikey_3 (a haystack of other needles), ruler_vt
  (repeated sentences), ruler_cwe (wonderwords' bundled word lists), ruler_fwe (random letters; scipy): generated
  from the tokenizer alone.
- niah_single_2, niah_single_3, niah_multikey_1, niah_multiquery, niah_multivalue: the Paul Graham essays haystack,
  the hub data set `baber/paul_graham_essays` (`datasets.load_dataset`): offline only once it is in the datasets
  cache (load it once online). Checked before the model is loaded; missing, a `RulerDataUnavailable` error says so.
- ruler_qa_squad (SQuAD 2.0 dev JSON from rajpurkar.github.io) and ruler_qa_hotpot (HotpotQA dev JSON from a
  huggingface.co URL): fetched with `requests` on every run, no cache: never offline. Refused up front in offline mode.

The offline shims (`offline_shims`, applied only around lm_eval's calls and undone after; reported in the results'
"shims"): lm_eval's RULER NIAH generator (`lm_eval.tasks.ruler.prepare_niah`, which every RULER task imports through
the niah_single_1.yaml they all include) calls `nltk.download("punkt_tab")` at import when that data is missing.
(1) In offline mode (`offline=True`, or HF_HUB_OFFLINE / HF_DATASETS_OFFLINE set) that call is answered "not
downloaded" without touching the network (where the network hangs rather than refuses, it would stall the run;
lm_eval still prints its own "Downloaded punkt_tab" line, wrongly). punkt_tab is used for one thing only: splitting
the essay haystack into sentences, to place needles at sentence boundaries; the other haystacks never call it.
(2) So when an essay task runs and punkt_tab is missing, `prepare_niah.sent_tokenize` is replaced by a regex splitter
(`regex_sent_tokenize`: a split after ., ! or ?, optionally closed by a quote or bracket, before whitespace). Needle
positions then differ slightly from punkt's, so such a score is flagged in "shims"; `nltk.download("punkt_tab")`
once online removes the need. Nothing else is needed: the tokenizer is a local folder, the data sets are built in
memory, and HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 is honoured throughout.

How lm_eval is driven (what `lm_eval --model hf --model_args pretrained=PATH,trust_remote_code=True --tasks T
--metadata '{"max_seq_lengths":[4096]}'` does, and where this differs):
- The tokenizer: RULER's generators load one by name, `AutoTokenizer.from_pretrained(metadata["tokenizer"] or
  model_args["pretrained"])` (lm_eval.tasks.ruler.common_utils.get_tokenizer): the CLI's `pretrained=PATH` is the
  local folder, so it resolves offline. Here the tokenizer is always passed as metadata["tokenizer"]: the model
  folder's, a folder given as `tokenizer=`, or a tokenizer object saved to a temporary folder.
- Lengths: metadata {"max_seq_lengths": [L]}. Each (task, length) is one `simple_evaluate` call (samples are built
  for that length only, `limit` applies per length, not to the first length of a concatenation, and the results so
  far are saved after each) on one HFLM (the model is loaded once), with a TaskManager that indexes only the
  RULER folder (the default one indexes all of lm_eval's 200+ task folders, 15-30 s a call here).
- The model: by default (`loader="package"`) loaded by us with hf_llama_mem imported (a LlamaMem folder loads as our
  registered class; a plain Llama folder as transformers' LlamaForCausalLM) and wrapped in `HFLM(pretrained=model)`;
  `loader="lm_eval"` lets HFLM load the folder itself with trust_remote_code=True, as the CLI does (with
  hf_llama_mem imported, transformers still picks the registered class; the bare `lm_eval` CLI, which does not
  import it, runs the folder's copied code files, and works offline too).
- No truncation: HFLM left-truncates prompts to max_length - max_gen_toks, and max_length defaults to the model's
  max_position_embeddings (8192 for SmolLM2), which would silently cut a 16K prompt to its last 8K tokens. Here
  max_length is at least twice the largest length, so every model reads the whole RULER prompt (`max_length=`
  restores a cap).
- Greedy generation of up to each task's max_gen_toks, stopping only at the tokenizer's EOS: `GENERATION` lists them.
  Scores are lm_eval's (fractions in [0, 1]; RULER papers report them x100). `apply_chat_template` as in lm_eval.

Interface for the CLI (`hf-llama-mem eval ruler`): `RulerTask(RulerOptions(...))` is an
hf_llama_mem.evals.common.Task, driven by `run_eval` like the others: `check(model, tokenizer)` (lm_eval installed,
a tokenizer given, its ids within the model's vocabulary, the tasks' data reachable), `evaluate(model, tokenizer)`
with a loaded model and a tokenizer object, then `table`, `card_rows`, `plot` of the returned dict. The options, one
flag each: tasks (default DEFAULT_TASKS; names in RULER_TASKS), lengths (default 4096; at least 256, 384 for
niah_multikey_3, 1024 for ruler_vt), limit (samples per task and length; default all 500), batch_size (1),
apply_chat_template (off), max_length (no cap), offline (auto), output_dir (for ruler_partial.json and
ruler_samples.jsonl as the run goes; the CLI's --output-dir fits). Bad values raise ValueError when the options are
built; a task whose data cannot be had raises RulerDataUnavailable (a ValueError) from `check`. lm_eval missing:
ImportError naming `pip install "hf-llama-mem[ruler]"`. `run_ruler(model_path, ...)` does the whole thing from a
path (model and tokenizer loading, torch threads), for scripts. Both return:

    {"task": "ruler", "tasks": [...], "lengths": [...], "limit": int | None,
     "scores": {task: {"4096": float}}, "samples": {task: {"4096": int}},     # scores in [0, 1]; samples scored
     "by_length": {"4096": mean over tasks}, "seconds": {task: {"4096": wall seconds}},
     "generation": {task: {"max_gen_toks": 128, "until": [...], "do_sample": False}},
     "shims": [str, ...], "max_length": int, "model_class": str, "lm_eval_version": str, "seed": int}

Time on a CPU: every task import builds RULER's 6M-word list (about 12 s, once per process); building 500 samples
per (task, length) takes seconds; a sample costs a prefill of L tokens plus up to max_gen_toks decode steps (a model
stops earlier only at EOS). On a CPU shared with other jobs, torch.set_num_threads(1) (`run_ruler(num_threads=1)`,
or OMP_NUM_THREADS=1) is much faster than the default: oversubscribed OpenMP threads spin-wait.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import json
import os
import re
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Literal

from .common import Task, figure, require, require_values

__all__ = [
    "ESSAY_DATASET",
    "GENERATION",
    "OFFLINE_TASKS",
    "RULER_TASKS",
    "RulerDataUnavailable",
    "RulerOptions",
    "RulerTask",
    "offline_shims",
    "regex_sent_tokenize",
    "run_ruler",
]

LM_EVAL_VERSION = "0.4.13"
INSTALL_HINT = 'pip install "hf-llama-mem[ruler]"'
ESSAY_DATASET = "baber/paul_graham_essays"

# The 13 RULER tasks of lm_eval 0.4.13 (lm_eval/tasks/ruler/*.yaml): the haystack or source each draws its samples
# from, and what that needs.
RULER_TASKS: dict[str, str] = {
    "niah_single_1": "repeat: a fixed sentence repeated (offline)",
    "niah_single_2": f"essay: hub data set {ESSAY_DATASET} (offline only once cached)",
    "niah_single_3": f"essay: hub data set {ESSAY_DATASET} (offline only once cached)",
    "niah_multikey_1": f"essay: hub data set {ESSAY_DATASET} (offline only once cached)",
    "niah_multikey_2": "needle: other needles as the haystack (offline)",
    "niah_multikey_3": "needle: other needles (uuids) as the haystack (offline)",
    "niah_multiquery": f"essay: hub data set {ESSAY_DATASET} (offline only once cached)",
    "niah_multivalue": f"essay: hub data set {ESSAY_DATASET} (offline only once cached)",
    "ruler_vt": "repeat: variable chains in repeated sentences (offline)",
    "ruler_cwe": "wonderwords' bundled word lists (offline)",
    "ruler_fwe": "random letter words, scipy (offline)",
    "ruler_qa_squad": "SQuAD 2.0 dev JSON from rajpurkar.github.io, fetched every run (never offline)",
    "ruler_qa_hotpot": "HotpotQA dev JSON from a huggingface.co URL, fetched every run (never offline)",
}
ESSAY_TASKS = ("niah_single_2", "niah_single_3", "niah_multikey_1", "niah_multiquery", "niah_multivalue")
DOWNLOAD_TASKS = ("ruler_qa_squad", "ruler_qa_hotpot")
OFFLINE_TASKS = ("niah_single_1", "niah_multikey_2", "niah_multikey_3", "ruler_vt", "ruler_cwe", "ruler_fwe")
DEFAULT_TASKS = ("niah_single_1", "niah_multikey_2", "niah_multikey_3", "ruler_vt")

# generation_kwargs of each task's yaml (greedy; `until` empty, so only EOS stops it before max_gen_toks).
GENERATION: dict[str, int] = {
    **{task: 128 for task in RULER_TASKS if task.startswith("niah_")},
    "ruler_vt": 30,
    "ruler_cwe": 120,
    "ruler_fwe": 50,
    "ruler_qa_squad": 32,
    "ruler_qa_hotpot": 32,
}

# Below these lengths the generator cannot fit its prompt (SmolLM2's tokenizer): the niah generators then raise,
# but ruler_vt's loops forever (a `while True` that only shrinks the filler), so vt is also checked with the actual
# tokenizer before it runs (see `vt_shortest_sample`).
MIN_LENGTHS = {"ruler_vt": 1024, "niah_multikey_3": 384}


class RulerDataUnavailable(ValueError):
    """A requested RULER task needs data that cannot be had here (offline, not cached)."""


def require_lm_eval() -> None:
    """lm_eval and RULER's generator dependencies, or an ImportError that says how to install them."""
    missing = [name for name in ("lm_eval", "nltk", "wonderwords", "scipy") if importlib.util.find_spec(name) is None]
    if missing:
        raise ImportError(
            f"The RULER evaluation needs lm-evaluation-harness {LM_EVAL_VERSION} and its RULER dependencies (nltk, "
            f"wonderwords, scipy); missing: {', '.join(missing)}. Install them with: {INSTALL_HINT}"
        )


def is_offline(offline: bool | None = None) -> bool:
    if offline is not None:
        return offline
    return any(
        os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")
        for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")
    )


# ---------------------------------------------------------------------------------------------------------------
# Offline shims


_SENTENCE_BREAK = re.compile(r"(?<=[.!?])\s+|(?<=[.!?][\"')\]])\s+")


def regex_sent_tokenize(text: str, language: str = "english") -> list[str]:
    """Sentences of `text`: a break after ., ! or ? (optionally closed by a quote or bracket) before whitespace.
    The stand-in for nltk's punkt `sent_tokenize` when its data is missing (used for essay haystacks only)."""
    return [piece for piece in _SENTENCE_BREAK.split(text) if piece]


def punkt_available() -> bool:
    import nltk

    try:
        nltk.data.find("tokenizers/punkt_tab")
    except LookupError:
        return False
    return True


@contextlib.contextmanager
def offline_shims(tasks: Sequence[str], offline: bool | None = None) -> Iterator[list[str]]:
    """Make lm_eval's RULER generators run without network (see the module docstring); yields the shims applied,
    as sentences for the results. Everything patched is restored on exit."""
    import nltk

    applied: list[str] = []
    original_download = nltk.download
    prepare_niah = None
    original_splitter = None
    missing = not punkt_available()
    if missing and is_offline(offline):

        def download(info_or_id=None, *args, **kwargs):
            if info_or_id in ("punkt_tab", "punkt"):
                return False
            return original_download(info_or_id, *args, **kwargs)

        nltk.download = download
        applied.append(
            "nltk.download('punkt_tab') at import of lm_eval.tasks.ruler.prepare_niah answered without network "
            "(punkt_tab is missing; only essay haystacks use it)"
        )
    try:
        if any(task in ESSAY_TASKS for task in tasks) and missing:
            prepare_niah = importlib.import_module("lm_eval.tasks.ruler.prepare_niah")
            if not punkt_available():  # still missing: not offline-blocked, but the download failed
                original_splitter = prepare_niah.sent_tokenize
                prepare_niah.sent_tokenize = regex_sent_tokenize
                prepare_niah.cached_sent_tokenize.cache_clear()
                applied.append(
                    "essay haystacks split into sentences by a regex (hf_llama_mem.evals.ruler.regex_sent_tokenize) "
                    "instead of nltk punkt_tab, which is missing: needle positions differ slightly from RULER's"
                )
        yield applied
    finally:
        nltk.download = original_download
        if original_splitter is not None:
            prepare_niah.sent_tokenize = original_splitter
            prepare_niah.cached_sent_tokenize.cache_clear()


def check_data_available(tasks: Sequence[str], offline: bool | None = None) -> None:
    """Raise RulerDataUnavailable, before any model is loaded, for tasks whose data cannot be had here."""
    problems = []
    if is_offline(offline):
        for task in tasks:
            if task in DOWNLOAD_TASKS:
                problems.append(f"{task} downloads its data on every run ({RULER_TASKS[task]})")
    essay_tasks = [task for task in tasks if task in ESSAY_TASKS]
    if essay_tasks:
        import datasets

        try:
            datasets.load_dataset(ESSAY_DATASET, split="train")
        except Exception as error:  # noqa: BLE001 - offline mode, no cache, no network: all mean "not here"
            problems.append(
                f"{', '.join(essay_tasks)} need the essay haystack, the hub data set {ESSAY_DATASET}, which is not "
                f"in the datasets cache and cannot be downloaded ({type(error).__name__}); load it once online "
                f"(python -c \"import datasets; datasets.load_dataset('{ESSAY_DATASET}', split='train')\")"
            )
    if problems:
        raise RulerDataUnavailable(
            "RULER tasks that cannot run here: "
            + "; ".join(problems)
            + f". Tasks that need no download: {', '.join(OFFLINE_TASKS)}."
        )


def vt_shortest_sample(tokenizer_path: str) -> int:
    """The shortest length (tokens) at which lm_eval's ruler_vt generator returns with this tokenizer; raises
    ValueError if it never can. The generator first builds an in-context example within 500 tokens from at least 5
    filler sentences, then each sample from that example, at least 10 filler sentences with one chain, and 30
    answer tokens; where these do not fit it retries forever (a `while True` around a bare `except`). Measured with
    RULER's own functions (the random state they consume is reseeded by simple_evaluate), with a 32-token margin for
    the randomness of variable names."""
    from lm_eval.tasks.ruler import vt_utils
    from lm_eval.tasks.ruler.common_utils import get_tokenizer

    margin = 32
    answer_budget = vt_utils.CONFIG["variable_tracking"]["tokens_to_generate"]
    tokenizer = get_tokenizer(tokenizer_path)
    example_text, example_answer = vt_utils.generate_input_output(5, 1, 4, is_icl=True)
    shortest_example = len(tokenizer(example_text + f" {example_answer}").input_ids) + answer_budget
    if shortest_example + margin > 500:
        raise ValueError(
            f"ruler_vt cannot run with this tokenizer: RULER builds its in-context example within 500 tokens, and "
            f"with this tokenizer the shortest takes about {shortest_example} (its generator would loop forever)."
        )
    with contextlib.redirect_stdout(None):  # the generator prints a line per size it tries
        example = vt_utils.sys_vartrack_w_noise_random(tokenizer, num_samples=1, max_seq_length=500, incremental=5)[0]
    example_tokens = len(tokenizer(example["input"] + " " + " ".join(example["outputs"]) + "\n\n").input_ids)
    text, _ = vt_utils.generate_input_output(10, 1, 4)
    return example_tokens + len(tokenizer(text).input_ids) + answer_budget + margin


# ---------------------------------------------------------------------------------------------------------------
# Running


@dataclass(frozen=True)
class RulerOptions:
    """RULER `tasks` (names from RULER_TASKS) at `lengths` (RULER's max_seq_length: prompt plus answer budget, in
    tokens), `limit` samples per (task, length) (None: all 500); `batch_size` of HFLM's generation;
    `apply_chat_template` as lm_eval's flag; `max_length` caps the prompt (None: never truncated); `offline`
    (None: from HF_HUB_OFFLINE / HF_DATASETS_OFFLINE); `output_dir`, if set, receives ruler_partial.json after each
    (task, length) and ruler_samples.jsonl (each answer with its target and score)."""

    tasks: tuple[str, ...] = DEFAULT_TASKS
    lengths: tuple[int, ...] = (4096,)
    limit: int | None = None
    batch_size: int = 1
    apply_chat_template: bool = False
    max_length: int | None = None
    offline: bool | None = None
    output_dir: str | None = None

    def __post_init__(self):
        require(len(self.tasks) > 0, "tasks must not be empty.")
        for task in self.tasks:
            require(task in RULER_TASKS, f"Unknown RULER task {task!r}; the tasks are: {', '.join(RULER_TASKS)}.")
        require(len(set(self.tasks)) == len(self.tasks), f"tasks are repeated: {self.tasks!r}.")
        require(all(isinstance(n, int) for n in self.lengths), f"lengths must be integers, got {self.lengths!r}.")
        require_values("lengths", self.lengths, 1)
        for task in self.tasks:
            shortest = max(256, MIN_LENGTHS.get(task, 0))
            require(
                min(self.lengths) >= shortest,
                f"{task} needs lengths of at least {shortest} tokens (below, RULER's generator cannot fit its "
                f"prompt and {GENERATION[task]} answer tokens), got {min(self.lengths)}.",
            )
        require(
            self.limit is None or (isinstance(self.limit, int) and self.limit >= 1),
            f"limit must be a positive integer or None, got {self.limit!r}.",
        )
        require(
            isinstance(self.batch_size, int) and self.batch_size >= 1,
            f"batch_size must be a positive integer, got {self.batch_size!r}.",
        )
        require(
            self.max_length is None or self.max_length > max(GENERATION[t] for t in self.tasks),
            f"max_length must exceed the tasks' answer budget, got {self.max_length!r}.",
        )


def resolve_max_length(config, lengths: Sequence[int], cap: int | None) -> int:
    """HFLM's max_length: `cap`, else the model's own limit (as lm_eval reads it from `config`) raised to at least
    twice the largest length, so that no prompt is truncated."""
    if cap is not None:
        return cap
    from lm_eval.models.utils import resolve_max_length as lm_eval_max_length

    return max(lm_eval_max_length(config, None, default=2048), 2 * max(lengths))


def build_lm(model, tokenizer, *, batch_size: int = 1, max_length: int | None = None, lengths=(4096,)):
    """lm_eval's HFLM over an already-loaded model and tokenizer object."""
    from lm_eval.models.huggingface import HFLM

    return HFLM(
        pretrained=model,
        tokenizer=tokenizer,
        batch_size=batch_size,
        max_length=resolve_max_length(model.config, lengths, max_length),
    )


@contextlib.contextmanager
def tokenizer_folder(tokenizer) -> Iterator[str]:
    """A folder RULER's generators can load the tokenizer from: its own folder if it has one, else a temporary copy."""
    name = getattr(tokenizer, "name_or_path", "") or ""
    if os.path.isdir(name) and os.path.isfile(os.path.join(name, "tokenizer_config.json")):
        yield name
        return
    with tempfile.TemporaryDirectory(prefix="ruler_tokenizer_") as folder:
        tokenizer.save_pretrained(folder)
        yield folder


def evaluate_lm(
    lm, tokenizer_path: str, options: RulerOptions, *, seed: int = 0, model_name: str = "", tokenizer_name: str = ""
) -> dict:
    """Run every (task, length) of `options` on an HFLM `lm`, generating samples with the tokenizer in
    `tokenizer_path` (reported as `tokenizer_name`, if given); return the results dict of the module docstring."""
    require_lm_eval()
    import lm_eval
    from lm_eval.tasks import TaskManager

    check_data_available(options.tasks, options.offline)
    ruler_folder = os.path.join(os.path.dirname(importlib.import_module("lm_eval.tasks").__file__), "ruler")
    results = {
        "task": "ruler",
        "model": model_name,
        "tasks": list(options.tasks),
        "lengths": list(options.lengths),
        "limit": options.limit,
        "scores": {task: {} for task in options.tasks},
        "samples": {task: {} for task in options.tasks},
        "seconds": {task: {} for task in options.tasks},
        "generation": {},
        "by_length": {},
        "shims": [],
        "max_length": lm.max_length,
        "model_class": f"{type(lm.model).__module__}.{type(lm.model).__name__}",
        "tokenizer": tokenizer_name or tokenizer_path,
        "lm_eval_version": lm_eval.__version__,
        "apply_chat_template": options.apply_chat_template,
        "seed": seed,
    }
    samples_file = None
    if options.output_dir:
        os.makedirs(options.output_dir, exist_ok=True)
        samples_file = open(os.path.join(options.output_dir, "ruler_samples.jsonl"), "w")
    try:
        with offline_shims(options.tasks, options.offline) as shims:
            if "ruler_vt" in options.tasks:
                shortest = vt_shortest_sample(tokenizer_path)
                require(
                    min(options.lengths) >= shortest,
                    f"ruler_vt cannot build a sample shorter than {shortest} tokens with this tokenizer (its "
                    f"generator would loop forever); got length {min(options.lengths)}.",
                )
            for length in options.lengths:
                for task in options.tasks:
                    manager = TaskManager(
                        include_path=ruler_folder,
                        include_defaults=False,
                        metadata={"max_seq_lengths": [length], "tokenizer": tokenizer_path},
                    )
                    start = time.perf_counter()
                    output = lm_eval.simple_evaluate(
                        model=lm,
                        tasks=[task],
                        limit=options.limit,
                        task_manager=manager,
                        bootstrap_iters=0,
                        log_samples=True,
                        apply_chat_template=options.apply_chat_template,
                        random_seed=seed,
                        numpy_random_seed=1234 + seed,
                        torch_random_seed=1234 + seed,
                        fewshot_random_seed=1234 + seed,
                    )
                    seconds = time.perf_counter() - start
                    record(results, output, task, length, seconds, samples_file)
                    results["shims"] = list(shims)
                    if options.output_dir:
                        with open(os.path.join(options.output_dir, "ruler_partial.json"), "w") as handle:
                            json.dump(results, handle, indent=2)
    finally:
        if samples_file is not None:
            samples_file.close()
    for length in options.lengths:
        scores = [results["scores"][task][str(length)] for task in options.tasks]
        results["by_length"][str(length)] = sum(scores) / len(scores)
    return results


def record(results: dict, output: dict, task: str, length: int, seconds: float, samples_file) -> None:
    """Copy one simple_evaluate output (one task, one length) into `results`."""
    key = str(length)
    results["scores"][task][key] = float(output["results"][task][f"{key},none"])
    results["samples"][task][key] = int(output["n-samples"][task]["effective"])
    results["seconds"][task][key] = round(seconds, 2)
    kwargs = output["configs"][task].get("generation_kwargs", {})
    results["generation"][task] = {
        "max_gen_toks": kwargs.get("max_gen_toks"),
        "until": list(kwargs.get("until", [])),
        "do_sample": kwargs.get("do_sample"),
    }
    if samples_file is not None:
        for sample in output.get("samples", {}).get(task, []):
            response = sample["filtered_resps"][0] if sample.get("filtered_resps") else sample["resps"][0][0]
            samples_file.write(
                json.dumps(
                    {
                        "task": task,
                        "length": length,
                        "index": sample["doc"].get("index"),
                        "tokens": sample["doc"].get("length"),
                        "target": sample["doc"].get("outputs"),
                        "response": response,
                        "score": sample.get(key),
                    }
                )
                + "\n"
            )
        samples_file.flush()


def load_for_ruler(model_path: str, tokenizer: str | None = None, dtype=None):
    """(model in eval mode, tokenizer) with hf_llama_mem imported: a LlamaMem folder loads as our registered class,
    a plain Llama folder as transformers' own. The tokenizer is `tokenizer` (a folder or hub id) or the model's.
    A GGUF checkpoint is converted to a folder first (`hf-llama-mem convert` / LlamaForCausalLM.save_pretrained)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import hf_llama_mem  # noqa: F401  (registers llama_mem with the Auto classes)

    if model_path.endswith(".gguf"):
        raise ValueError(f"{model_path} is a GGUF file: RULER needs a model folder (convert it first).")
    loaded_tokenizer = AutoTokenizer.from_pretrained(tokenizer or model_path)
    kwargs = {} if dtype is None else {"dtype": dtype}
    return AutoModelForCausalLM.from_pretrained(model_path, **kwargs).eval(), loaded_tokenizer


def run_ruler(
    model_path: str,
    tasks: Sequence[str] = DEFAULT_TASKS,
    lengths: Sequence[int] = (4096,),
    limit: int | None = None,
    *,
    tokenizer: str | None = None,
    batch_size: int = 1,
    device: str = "cpu",
    output_dir: str | None = None,
    loader: Literal["package", "lm_eval"] = "package",
    apply_chat_template: bool = False,
    max_length: int | None = None,
    offline: bool | None = None,
    seed: int = 0,
    dtype=None,
    num_threads: int | None = None,
) -> dict:
    """RULER `tasks` at `lengths` on the model at `model_path` (a folder or hub id), `limit` samples per
    (task, length). The tokenizer is the model folder's (or `tokenizer`, a folder). `loader="package"` loads the
    model here with hf_llama_mem imported; `loader="lm_eval"` lets lm_eval's HFLM load the folder with
    trust_remote_code=True, as its CLI does. With `output_dir`, writes ruler.json (and, as it goes,
    ruler_partial.json and ruler_samples.jsonl). `num_threads` sets torch's CPU threads (on a CPU shared with other
    jobs, 1 thread decodes SmolLM2-135M ~10x faster than 2: OpenMP threads spin-wait when oversubscribed). Returns
    the results dict of the module docstring."""
    require_lm_eval()
    if num_threads is not None:
        import torch

        torch.set_num_threads(num_threads)
    options = RulerOptions(
        tasks=tuple(tasks),
        lengths=tuple(lengths),
        limit=limit,
        batch_size=batch_size,
        apply_chat_template=apply_chat_template,
        max_length=max_length,
        offline=offline,
        output_dir=output_dir,
    )
    check_data_available(options.tasks, options.offline)  # before the (slow) model load
    if loader == "lm_eval":
        from lm_eval.models.huggingface import HFLM
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(model_path, trust_remote_code=True)
        lm = HFLM(
            pretrained=model_path,
            tokenizer=tokenizer,
            trust_remote_code=True,
            device=device,
            batch_size=batch_size,
            dtype=dtype or "auto",
            max_length=resolve_max_length(config, options.lengths, max_length),
        )
        results = evaluate_lm(lm, tokenizer or model_path, options, seed=seed, model_name=model_path)
    elif loader == "package":
        model, loaded_tokenizer = load_for_ruler(model_path, tokenizer, dtype)
        model.to(device)
        lm = build_lm(model, loaded_tokenizer, batch_size=batch_size, max_length=max_length, lengths=options.lengths)
        with tokenizer_folder(loaded_tokenizer) as tokenizer_path:
            results = evaluate_lm(
                lm, tokenizer_path, options, seed=seed, model_name=model_path, tokenizer_name=tokenizer or model_path
            )
    else:
        raise ValueError(f"loader must be 'package' or 'lm_eval', got {loader!r}.")
    if output_dir:
        with open(os.path.join(output_dir, "ruler.json"), "w") as handle:
            json.dump(results, handle, indent=2)
    return results


# ---------------------------------------------------------------------------------------------------------------
# The Task of `hf-llama-mem eval ruler`


class RulerTask(Task):
    """RULER through lm_eval on a loaded model and tokenizer (see RulerOptions and the module docstring)."""

    name = "ruler"

    def __init__(self, options: RulerOptions | None = None):
        self.options = options or RulerOptions()

    def check(self, model, tokenizer=None) -> None:
        require_lm_eval()
        require(tokenizer is not None, "RULER builds its samples from text: it needs the model's tokenizer.")
        vocabulary = len(tokenizer)
        require(
            vocabulary <= model.config.vocab_size,
            f"The tokenizer has {vocabulary} tokens, more than this model's vocabulary of {model.config.vocab_size}.",
        )
        check_data_available(self.options.tasks, self.options.offline)

    def evaluate(self, model, tokenizer=None, *, seed: int = 0, progress: bool = True) -> dict:
        """Progress bars are lm_eval's own (`progress` is not used)."""
        require_lm_eval()
        require(tokenizer is not None, "RULER builds its samples from text: it needs the model's tokenizer.")
        was_training = model.training
        model.eval()
        lm = build_lm(
            model,
            tokenizer,
            batch_size=self.options.batch_size,
            max_length=self.options.max_length,
            lengths=self.options.lengths,
        )
        try:
            with tokenizer_folder(tokenizer) as tokenizer_path:
                results = evaluate_lm(
                    lm, tokenizer_path, self.options, seed=seed, model_name=getattr(model.config, "_name_or_path", "")
                )
        finally:
            model.train(was_training)
        return results

    def table(self, results: dict) -> str:
        lengths = [str(n) for n in results["lengths"]]
        rows = ["| task \\ length | " + " | ".join(lengths) + " |", "|---" * (len(lengths) + 1) + "|"]
        for task in results["tasks"]:
            cells = [f"{results['scores'][task][n]:.3f} ({results['samples'][task][n]})" for n in lengths]
            rows.append(f"| {task} | " + " | ".join(cells) + " |")
        rows.append("| mean | " + " | ".join(f"{results['by_length'][n]:.3f}" for n in lengths) + " |")
        return "\n".join(rows)

    def card_rows(self, results: dict) -> list[dict]:
        rows = [
            {"setting": f"RULER {task}, length {n}", "metric": "score", "value": results["scores"][task][str(n)]}
            for task in results["tasks"]
            for n in results["lengths"]
        ]
        rows += [
            {"setting": f"RULER mean of {len(results['tasks'])} tasks, length {n}", "metric": "score", "value": value}
            for n, value in results["by_length"].items()
        ]
        return rows

    def plot(self, results: dict, path: str, title: str = "") -> None:
        labels = ("RULER length (tokens)", "score")
        with figure(path, title or self.name, *labels, log2_x=True, ylim=(-0.05, 1.05)) as axis:
            lengths = results["lengths"]
            for task in results["tasks"]:
                axis.plot(lengths, [results["scores"][task][str(n)] for n in lengths], marker="o", label=task)
            axis.plot(lengths, [results["by_length"][str(n)] for n in lengths], "k--", marker="s", label="mean")
