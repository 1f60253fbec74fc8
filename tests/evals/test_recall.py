import pytest
import torch

from hf_llama_mem.demo import DemoSettings, format_table, run_demo
from hf_llama_mem.evals.common import answer_accuracy
from hf_llama_mem.evals.recall import AssociativeRecall


def test_answer_accuracy_scores_only_asked_positions():
    logits = torch.zeros(1, 4, 10)
    logits[0, 0, 3] = logits[0, 1, 7] = logits[0, 2, 5] = 1.0  # predictions for positions 1, 2, 3: 3, 7, 5
    labels = torch.tensor([[-100, 3, -100, 6]])
    assert answer_accuracy(logits, labels).tolist() == [True, False]


def test_recall_sequences_put_every_pair_at_least_the_gap_before_its_query():
    task = AssociativeRecall(num_pairs=4, gap=20)
    batch = task.sample(3, torch.Generator().manual_seed(0))
    ids, labels = batch["input_ids"], batch["labels"]
    assert ids.shape == (3, 4 * 4 + 20)
    for row in range(3):
        pairs = dict(zip(ids[row, 0:8:2].tolist(), ids[row, 1:8:2].tolist(), strict=True))
        queries = ids[row, -8:].tolist()
        for query_pos, (key, value) in enumerate(zip(queries[0::2], queries[1::2], strict=True)):
            assert pairs[key] == value
            assert (ids.shape[1] - 8 + 2 * query_pos) - 2 * list(pairs).index(key) >= 20
        assert labels[row].ne(-100).sum() == 4 and labels[row, -1] == ids[row, -1]


def test_perfect_predictions_score_one():
    task = AssociativeRecall(num_pairs=3, gap=10)
    batch = task.sample(2, torch.Generator().manual_seed(0))
    logits = torch.nn.functional.one_hot(batch["input_ids"].roll(-1, 1), task.vocab_size).float()
    assert answer_accuracy(logits, batch["labels"]).all()


@pytest.mark.slow
def test_short_demo_memory_beats_baseline_by_a_wide_margin(tmp_path):
    results = run_demo(str(tmp_path), DemoSettings(steps=350, eval_sequences=128))
    print(format_table(results))
    assert results["memory"]["recall_at_1x"] > 0.6
    assert results["memory"]["recall_at_1x"] - results["baseline"]["recall_at_1x"] > 0.5
    assert abs(results["baseline"]["recall_at_1x"] - results["settings"]["chance"]) < 0.1
    assert (tmp_path / "recall.png").exists() and (tmp_path / "model" / "model.safetensors").exists()
    assert results["memory"]["history"][-1]["gate_layer0"] > 0
