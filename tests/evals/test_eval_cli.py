"""`hf-llama-mem eval` end to end on a small saved model: table, JSON, PNG and the model card's rows."""

import json

import pytest
from huggingface_hub import ModelCard
from transformers import ByT5Tokenizer

from hf_llama_mem.cli import main

from ..helpers import tiny_model


@pytest.fixture
def saved_model(tmp_path):
    """A tiny LlamaMem folder with its (byte) tokenizer, whose 384 ids also hold the recall task's 144."""
    tiny_model(vocab_size=384, max_position_embeddings=4096).save_pretrained(tmp_path / "model")
    ByT5Tokenizer().save_pretrained(tmp_path / "model")
    return str(tmp_path / "model")


@pytest.mark.parametrize(
    "task, options, row",
    [
        ("passkey", ["--lengths", "128,256", "--samples", "2", "--depths", "0,1"], "| 256 |"),
        ("passkey", ["--lengths", "64", "--samples", "2", "--format", "recall-tokens"], "| 64 |"),
        ("recall", ["--gaps", "16,32", "--sequences", "8"], "| 32 |"),
        ("perplexity", ["--max-tokens", "100", "--segment", "32"], "| 64-100 |"),
    ],
)
def test_eval_writes_table_json_plot_and_card_rows(saved_model, tmp_path, capsys, task, options, row):
    if task == "perplexity":
        (tmp_path / "doc.txt").write_text("def f(x):\n    return x + 1\n" * 10)
        options = options + ["--files", str(tmp_path / "doc.txt")]
    main(["eval", task, "--model", saved_model, "--output-dir", str(tmp_path / "out"), *options])
    table = capsys.readouterr().out
    assert row in table
    results = json.loads((tmp_path / "out" / f"{task}.json").read_text())
    assert results["task"] == task and results["model"] == saved_model
    assert (tmp_path / "out" / f"{task}.png").read_bytes()[:4] == b"\x89PNG"
    card = ModelCard.load(f"{saved_model}/README.md", ignore_metadata_errors=False)
    assert f"| {task} |" in card.text
    assert task in json.loads(open(f"{saved_model}/eval_results.json").read())


def test_recall_refuses_a_model_whose_vocabulary_is_too_small(tmp_path, capsys):
    tiny_model(vocab_size=100).save_pretrained(tmp_path / "small")
    with pytest.raises(SystemExit) as exit_info:
        main(["eval", "recall", "--model", str(tmp_path / "small"), "--output-dir", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    assert "vocabulary of at least 144" in capsys.readouterr().err
    assert not (tmp_path / "out" / "recall.json").exists()
