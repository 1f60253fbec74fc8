"""The task base: typed options refuse bad values by name, each task checks a model before any work, and run_eval
(typed arguments, no argparse) asks for a tokenizer only where a task reads text and never guesses one."""

import json

import pytest
from transformers import ByT5Tokenizer

from hf_llama_mem.evals import (
    PasskeyOptions,
    PasskeyTask,
    PerplexityOptions,
    PerplexityTask,
    RecallOptions,
    RecallTask,
    Task,
    run_eval,
)
from hf_llama_mem.evals.perplexity import PerplexityByPosition

from ..helpers import tiny_model


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: PasskeyOptions(samples=0), "samples must be a positive integer, got 0"),
        (lambda: PasskeyOptions(lengths=()), "lengths must not be empty"),
        (lambda: PasskeyOptions(lengths=(256, 0)), "lengths must each be in .1, inf., got 0"),
        (lambda: PasskeyOptions(depths=(0.5, 1.5)), "depths must each be in .0, 1., got 1.5"),
        (lambda: PasskeyOptions(format="bytes"), "format must be one of .*'bytes'"),
        (lambda: RecallOptions(gaps=()), "gaps must not be empty"),
        (lambda: RecallOptions(sequences=0), "sequences must be a positive integer, got 0"),
        (lambda: PerplexityOptions(segment=0), "segment must be a positive integer, got 0"),
        (lambda: PerplexityOptions(max_tokens=1), "max_tokens must be an integer >= 2.*got 1"),
        (lambda: PerplexityOptions(files=()), "files must not be empty"),
        (lambda: PerplexityOptions(window=0), "window must be a positive integer, got 0"),
        (lambda: PerplexityByPosition(segment=0), "segment must be a positive integer, got 0"),
    ],
)
def test_options_refuse_bad_values_by_name(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_every_task_implements_the_base():
    for task in (PasskeyTask(), RecallTask(), PerplexityTask()):
        assert isinstance(task, Task) and task.name in ("passkey", "recall", "perplexity")
    assert PasskeyTask().needs_tokenizer() and PerplexityTask().needs_tokenizer()
    assert not RecallTask().needs_tokenizer()
    assert not PasskeyTask(PasskeyOptions(format="recall-tokens")).needs_tokenizer()


def test_checks_refuse_a_model_that_cannot_run_the_task_before_any_work():
    small = tiny_model(vocab_size=100)
    with pytest.raises(ValueError, match="vocabulary of at least 144"):
        RecallTask().check(small)
    with pytest.raises(ValueError, match="beyond this model's vocabulary of 100"):
        PasskeyTask(PasskeyOptions(format="recall-tokens", lengths=(64,))).check(small)
    with pytest.raises(ValueError, match="length 8 is shorter than the passkey"):
        PasskeyTask(PasskeyOptions(format="recall-tokens", lengths=(64, 8))).check(tiny_model(vocab_size=384))
    PasskeyTask(PasskeyOptions(lengths=(128,))).check(tiny_model(vocab_size=384), ByT5Tokenizer())


def test_a_named_document_shorter_than_max_tokens_is_an_error_not_left_out(tmp_path):
    (tmp_path / "short.txt").write_text("x = 1\n")
    task = PerplexityTask(PerplexityOptions(files=(str(tmp_path / "short.txt"),), max_tokens=100))
    with pytest.raises(ValueError, match=r"short.txt has 7 tokens, fewer than max_tokens=100"):
        task.evaluate(tiny_model(vocab_size=384), ByT5Tokenizer())


def test_perplexity_refuses_ids_beyond_the_vocabulary(tmp_path):
    (tmp_path / "doc.txt").write_text("def f(x):\n    return x + 1\n" * 10)
    task = PerplexityTask(PerplexityOptions(files=(str(tmp_path / "doc.txt"),), max_tokens=64))
    with pytest.raises(ValueError, match="beyond this model's vocabulary of 100"):
        task.evaluate(tiny_model(vocab_size=100), ByT5Tokenizer())


def test_an_explicit_window_sets_the_buckets_even_for_a_windowed_model():
    model = tiny_model()
    assert PerplexityTask().window(model) == model.config.sliding_window == 8
    assert PerplexityTask(PerplexityOptions(window=32)).window(model) == 32


@pytest.fixture
def folder_without_tokenizer(tmp_path):
    tiny_model(vocab_size=384).save_pretrained(tmp_path / "model")
    return str(tmp_path / "model")


def test_run_eval_never_guesses_a_tokenizer(folder_without_tokenizer, tmp_path):
    task = PasskeyTask(PasskeyOptions(lengths=(128,), depths=(0.0,), samples=1))
    with pytest.raises(ValueError, match="has no tokenizer: pass --tokenizer"):
        run_eval(task, folder_without_tokenizer, str(tmp_path / "out"))
    results = run_eval(task, folder_without_tokenizer, str(tmp_path / "out"), tokenizer="byt5", progress=False)
    assert results["lengths"] == [128] and json.loads((tmp_path / "out" / "passkey.json").read_text())["grid"]


def test_tasks_that_read_ids_need_no_tokenizer_and_refuse_one(folder_without_tokenizer, tmp_path):
    task = RecallTask(RecallOptions(gaps=(8,), sequences=2))
    results = run_eval(task, folder_without_tokenizer, str(tmp_path / "out"), record=False, progress=False)
    assert set(results["by_distance"]) == {"8"}
    with pytest.raises(ValueError, match="reads token ids: a tokenizer .'byt5'. would not be used"):
        run_eval(task, folder_without_tokenizer, str(tmp_path / "out"), tokenizer="byt5")


def test_run_eval_checks_before_it_scores(folder_without_tokenizer, tmp_path, monkeypatch):
    def no_work(*args, **kwargs):
        raise AssertionError("evaluate ran although the check should have failed")

    task = PasskeyTask(PasskeyOptions(format="recall-tokens", lengths=(8,)))
    monkeypatch.setattr(task, "evaluate", no_work)
    with pytest.raises(ValueError, match="length 8 is shorter"):
        run_eval(task, folder_without_tokenizer, str(tmp_path / "out"))
    assert not (tmp_path / "out" / "passkey.json").exists()
