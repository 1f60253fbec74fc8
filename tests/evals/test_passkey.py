import pytest
import torch
from transformers import ByT5Tokenizer

from hf_llama_mem.evals.common import exact_match
from hf_llama_mem.evals.passkey import PasskeyOptions, PasskeyTask, RecallTokenFormat, TextFormat, summarize
from hf_llama_mem.evals.recall import AssociativeRecall

from ..helpers import tiny_model


def one_hot_logits(predictions: list[list[int]], vocab: int = 10) -> torch.Tensor:
    return torch.nn.functional.one_hot(torch.tensor(predictions), vocab).float()


def test_exact_match_needs_every_answer_token():
    labels = torch.tensor([[-100, -100, 4, 5], [-100, -100, 4, 5]])
    # logits at t predict labels[t + 1]: rows predict (x, 4, 5) and (x, 4, 6)
    logits = one_hot_logits([[0, 4, 5, 9], [0, 4, 6, 9]])
    assert exact_match(logits, labels).tolist() == [True, False]
    with pytest.raises(ValueError, match="labelled answer"):
        exact_match(logits, torch.full((2, 4), -100))


def test_text_passkey_hides_the_key_at_the_depth_and_asks_for_it_at_the_end():
    tokenizer = ByT5Tokenizer()
    fmt = TextFormat(tokenizer)
    task = PasskeyTask()
    for depth in (0.0, 0.5, 1.0):
        sample = task.build(fmt, 400, depth, torch.Generator().manual_seed(3))
        ids, labels = sample["input_ids"][0], sample["labels"][0]
        assert ids.shape == labels.shape == (400,)
        text = tokenizer.decode(ids)
        answer = tokenizer.decode(ids[labels != -100])
        assert text.endswith("What is the pass key? The pass key is" + answer)
        key = answer.strip()
        assert len(key) == 5 and key.isdigit()
        needle = f"The pass key is {key}. Remember it. {key} is the pass key. "
        filler = 400 - len(needle) - len("What is the pass key? The pass key is" + answer)  # one byte per token
        assert text.index(needle) == round(depth * filler)


def test_recall_token_passkey_scores_only_the_values():
    task = AssociativeRecall()
    sample = PasskeyTask().build(RecallTokenFormat(task, digits=3), 64, 0.25, torch.Generator().manual_seed(0))
    ids, labels = sample["input_ids"][0], sample["labels"][0]
    asked = labels != -100
    assert asked.sum() == 3 and torch.equal(labels[asked], ids[asked])
    assert ((ids[asked] >= task.num_keys) & (ids[asked] < task.num_keys + task.num_values)).all()
    needle = ids[-6:]
    assert any(torch.equal(ids[i : i + 6], needle) for i in range(0, 58 - 6))


def test_lengths_shorter_than_the_passkey_are_refused():
    with pytest.raises(ValueError, match="shorter than the passkey"):
        PasskeyTask().build(TextFormat(ByT5Tokenizer()), 50, 0.5, torch.Generator())


def test_summary_averages_by_length_and_depth():
    grid = {(100, 0.0): 1.0, (100, 1.0): 0.5, (200, 0.0): 0.0, (200, 1.0): 0.5}
    summary = summarize(grid, (100, 200), (0.0, 1.0))
    assert summary["by_length"] == {"100": 0.75, "200": 0.25}
    assert summary["by_depth"] == {"0.0": 0.5, "1.0": 0.5}
    assert summary["accuracy"] == 0.5 and summary["grid"] == [[1.0, 0.5], [0.0, 0.5]]


def test_evaluate_scores_a_model_that_copies_perfectly():
    class Oracle(torch.nn.Module):
        """Predicts, at every position, the token that actually comes next in this very sample."""

        def __init__(self):
            super().__init__()
            self.config, self.device, self.training = tiny_model().config, torch.device("cpu"), False

        def forward(self, input_ids, logits_to_keep=0):
            nxt = torch.cat([input_ids[:, 1:], input_ids[:, :1]], 1)
            logits = torch.nn.functional.one_hot(nxt, 300).float()[:, -logits_to_keep:]
            return type("Output", (), {"logits": logits})

    task = PasskeyTask(PasskeyOptions(lengths=(200,), depths=(0.0, 1.0), samples=2))
    result = task.evaluate(Oracle(), ByT5Tokenizer(), progress=False)
    assert result["accuracy"] == 1.0
