"""The long-context training samples: exact lengths, labels only on the answer, needles beyond min_gap, seeded,
templates of their own (not the passkey evaluation's nor RULER's), the mix, the length curriculum, the docs split."""

import random
import re
from pathlib import Path

import pytest
from transformers import ByT5Tokenizer

from hf_llama_mem import long_context_data as lcd
from hf_llama_mem.corpus import python_docs_files, python_docs_root, stdlib_source_files
from hf_llama_mem.evals import chat_recall
from hf_llama_mem.evals.chat_recall import FACTS
from hf_llama_mem.evals.passkey import FILLER
from hf_llama_mem.long_context_data import (
    KINDS,
    RETRIEVAL_KINDS,
    LengthCurriculum,
    LongContextData,
    LongContextStream,
    Mix,
    NaturalText,
    clean_doc_text,
)

# What the passkey evaluation and RULER's needle tasks say: none of it may be in the training samples.
EVAL_PHRASES = [s.strip() + "." for s in FILLER.split(".") if s.strip()] + [
    "pass key",
    "Remember it",
    "special magic",  # RULER's needles: "One of the special magic numbers for ... is: ..."
    "VAR ",  # RULER's variable tracking: "VAR ABCDE = 12345"
    "Extract the value corresponding",  # RULER's key-value retrieval
]
MIN_GAP = 40
# A chat template whose tokens are plain bytes: "<role>" opens a turn and "#" ends it.
CHAT_TEMPLATE = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}#{% endfor %}"


@pytest.fixture(scope="module")
def tokenizer():
    tokenizer = ByT5Tokenizer()
    tokenizer.chat_template = CHAT_TEMPLATE  # for the conversation kind; retrieval samples use it only if asked to
    return tokenizer


@pytest.fixture(scope="module")
def text(tokenizer):
    try:
        files = python_docs_files("train")[:6]
    except FileNotFoundError:
        files = stdlib_source_files("train")[:6]
    return NaturalText(tokenizer, files)


@pytest.fixture(scope="module")
def data(tokenizer, text):
    return LongContextData(tokenizer, text, min_gap=MIN_GAP)


def as_bytes(ids: list[int]) -> bytes:
    return bytes(i - 3 for i in ids)  # ByT5: byte b is token b + 3


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("length", [420, 777])
def test_every_kind_has_the_exact_length_and_labels_only_on_the_answer(data, tokenizer, kind, length):
    for seed in range(4):
        sample = data.generate(kind, length, seed)
        ids, labels = sample["input_ids"], sample["labels"]
        assert len(ids) == len(labels) == length and sample["kind"] == kind
        if kind == "language_modelling":
            assert labels == ids
            continue
        answer = tokenizer(" " + sample["answer"], add_special_tokens=False).input_ids
        if kind == "conversation":  # a reply always ends its turn
            answer += tokenizer(".#", add_special_tokens=False).input_ids
        assert labels[-len(answer) :] == ids[-len(answer) :] == answer  # the answer ends the sample, labelled
        assert set(labels[: -len(answer)]) == {-100}  # and nothing else is


@pytest.mark.parametrize("kind", [k for k in RETRIEVAL_KINDS if k != "conversation"])
def test_answer_end_labels_the_period_and_the_end_of_the_chat_turn(tokenizer, text, kind):
    data = LongContextData(tokenizer, text, min_gap=MIN_GAP, chat_fraction=0.5, answer_end=True)
    endings = set()
    for seed in range(8):
        sample = data.generate(kind, 500, seed)
        ids, labels = sample["input_ids"], sample["labels"]
        chat = as_bytes(ids).startswith(b"<user>")
        end = b"." + (b"#" if chat else b"")  # "#" ends the template's assistant turn
        answer = as_bytes(tokenizer(" " + sample["answer"], add_special_tokens=False).input_ids) + end
        labelled = [i for i in labels if i != -100]
        assert len(ids) == 500 and as_bytes(labelled) == answer and as_bytes(ids).endswith(answer)
        assert labels[-len(labelled) :] == labelled  # the labelled tokens end the sample, together
        endings.add(chat)
    assert endings == {True, False}  # both kinds of ending were drawn


@pytest.mark.parametrize("kind", ["passkey", "multi_needle", "kv_lookup"])
def test_the_asked_statement_ends_at_least_min_gap_tokens_before_the_question(data, kind):
    for seed in range(6):
        sample = data.generate(kind, 600, seed)
        answer = sample["answer"].encode()
        body = as_bytes(sample["input_ids"])[: -len(answer) - 1]
        question_start = body.rfind(b"\n\n")  # every question style starts with a blank line
        statement_end = body.rfind(answer, 0, question_start) + len(answer)
        assert statement_end >= len(answer), f"the answer {answer} is not in the context"
        assert question_start - statement_end >= MIN_GAP


def marked_spans(sample) -> list[bytes]:
    """The runs of tokens the statement mask marks, as bytes."""
    spans, current = [], []
    for token, marked in zip(sample["input_ids"], sample["statement_mask"], strict=True):
        if marked:
            current.append(token)
        elif current:
            spans.append(as_bytes(current))
            current = []
    return spans + ([as_bytes(current)] if current else [])


@pytest.mark.parametrize("kind", KINDS)
def test_the_statement_mask_marks_what_a_question_may_depend_on_and_nothing_else(tokenizer, text, kind):
    data = LongContextData(tokenizer, text, min_gap=MIN_GAP, chat_fraction=0.5)
    for seed in range(6):
        sample = data.generate(kind, 900, seed)
        assert len(sample["statement_mask"]) == 900 and set(sample["statement_mask"]) <= {0, 1}
        spans = marked_spans(sample)
        if kind == "language_modelling":
            assert spans == []
            continue
        # The answer's own statement is marked; the question and the answer after it are not.
        answer = sample["answer"].split(", ")[0].encode()
        assert any(answer in span for span in spans), (answer, spans)
        assert not any(sample["statement_mask"][-len(answer) - 24 :])
        if kind in ("passkey", "multi_needle"):  # exactly the statements, each a whole fact: no haystack
            templates = [t[1] for t in lcd.FACT_TEMPLATES + lcd.NAME_FACT_TEMPLATES]
            for span in spans:
                assert span[:1] in b"\n " and span[-1:] in b"\n "
                assert any(all(p in span.decode() for p in re.split(r"\{\w\}", t)) for t in templates), span
        if kind == "conversation":  # the opening turn states the asked fact
            assert answer in spans[0]


def test_variable_tracking_asks_a_chain_that_is_in_the_context(data):
    for seed in range(8):
        sample = data.generate("variable_tracking", 700, seed)
        text = as_bytes(sample["input_ids"]).decode(errors="replace")
        if "," in sample["answer"] or "value of" not in text[-80:]:
            names = sample["answer"].split(", ")
            assert all(f" {n}." in text or f" {n} " in text for n in names)
        else:
            assert sample["answer"] in text[: -len(sample["answer"]) - 1]


def test_samples_are_a_function_of_their_seed(data):
    for kind in KINDS:
        assert data.generate(kind, 500, 7) == data.generate(kind, 500, 7)
        assert data.generate(kind, 500, 7)["input_ids"] != data.generate(kind, 500, 8)["input_ids"]
    assert data.generate("passkey", 500, random.Random(3)) == data.generate("passkey", 500, 3)


def test_the_templates_are_not_the_passkey_evals_nor_rulers(tokenizer, text):
    own_text = " ".join(
        [part for template in lcd.FACT_TEMPLATES + lcd.NAME_FACT_TEMPLATES for part in template[1:]]
        + list(lcd.SENTENCES)
        + list(lcd.QUESTION_STYLES)
        + [part for style in lcd.RECORD_STYLES for part in style]
        + [part for question in lcd.RECORD_QUESTIONS for part in question]
        + list(lcd.VARIABLE_STYLES)
        + [part for fact in lcd.CHAT_FACTS for part in fact[1:]]
        + list(lcd.CHAT_PHRASES)
    )
    repeated_only = LongContextData(tokenizer, text, haystacks={"repeated": 1.0}, word_answers=0.5)
    samples = [repeated_only.generate(kind, 900, seed) for kind in RETRIEVAL_KINDS for seed in range(5)]
    decoded = [as_bytes(s["input_ids"]).decode(errors="replace") for s in samples]
    for phrase in EVAL_PHRASES:
        assert phrase.lower() not in own_text.lower(), phrase
        assert not any(phrase.lower() in d.lower() for d in decoded), phrase


def test_word_answers_ask_for_names_that_the_chat_recall_evaluation_never_uses(tokenizer, text, data):
    words = LongContextData(tokenizer, text, min_gap=MIN_GAP, word_answers=0.5)
    answers = [words.generate("passkey", 500, seed)["answer"] for seed in range(40)]
    named = [a for a in answers if not a.isdigit()]
    assert 5 < len(named) < 35 and set(named) <= set(lcd.NAME_ANSWERS)
    assert not set(lcd.NAME_ANSWERS) & {fact.answer for fact in FACTS}  # the evaluation's answers stay held out
    # Without word answers the samples are what they were before the option existed: the draws of that code, replayed
    # here, give the same samples (an extra draw, even one not acted on, would shift every later one).
    for seed in range(5):
        rng = random.Random(seed)
        template = rng.choice(lcd.FACT_TEMPLATES)
        number = data.number(rng)
        statement, question, prefix = data.fact(template, data.subject(template, rng, set()), number)
        before = data.assemble("passkey", [data.statement(statement, rng)], question, prefix, number, 500, rng)
        assert data.generate("passkey", 500, seed) == before
    with pytest.raises(ValueError, match="word_answers must be in \\[0, 1\\], got 1.5"):
        LongContextData(tokenizer, text, word_answers=1.5)


def test_a_conversation_asks_for_its_first_fact_min_gap_tokens_later_among_distractors(tokenizer, text):
    data = LongContextData(tokenizer, text, min_gap=300)
    distracted = 0
    for seed in range(12):
        sample = data.generate("conversation", 900, seed)
        turns = as_bytes(sample["input_ids"]).decode(errors="replace").split("#")
        assert turns[0].startswith("<user>") and turns[-1] == "" and len(turns) >= 5
        answer = sample["answer"]
        assert answer in turns[0] and turns[-2] == f"<assistant>{turns[-2][11 : -len(answer) - 2]} {answer}."
        # the question's turn: the first fact's question, at least min_gap bytes after the fact's turn
        asked = next(fact for fact in lcd.CHAT_FACTS if fact[1].format(n=answer).lower() in turns[0].lower())
        assert asked[2][1:] in turns[-3] and turns[-3].startswith("<user>")
        assert len("#".join(turns[1:-3])) >= 300
        assert (answer in lcd.NAME_ANSWERS) == (asked[0] == "name") and (answer.isdigit() == (asked[0] == "number"))
        others = [t for t in turns[1:-3] if any(a.split("{")[0] in t for a in lcd.CHAT_ASIDES)]
        distracted += bool(others)
        assert not any(f" {answer}." in t for t in others)  # a distractor never holds the answer
    assert 0 < distracted < 12
    # The chat-recall evaluation stays held out: none of its facts, answers or phrasings are the kind's.
    ours = " ".join([part for fact in lcd.CHAT_FACTS for part in fact[1:]] + list(lcd.CHAT_PHRASES)).lower()
    for fact in FACTS:
        assert fact.question.lower() not in ours and fact.answer.lower() not in ours.split()
    for phrase in (chat_recall.ACKNOWLEDGEMENT, "I have a few questions for you today", "Please answer briefly"):
        assert phrase.lower() not in ours, phrase
    with pytest.raises(ValueError, match="conversation kind needs a tokenizer with a chat template"):
        LongContextData(ByT5Tokenizer(), text).generate("conversation", 900, 0)
    with pytest.raises(ValueError, match="conversation sample of 200 tokens .*min_gap=300"):
        data.generate("conversation", 200, 0)


def test_too_short_a_length_is_refused_by_name(data):
    with pytest.raises(ValueError, match="passkey sample of 60 tokens.*min_gap=40"):
        data.generate("passkey", 60, 0)
    with pytest.raises(ValueError, match="Unknown sample kind"):
        data.generate("needle", 500, 0)


def test_the_chat_template_wraps_retrieval_samples(tokenizer, text):
    chat_tokenizer = ByT5Tokenizer()
    chat_tokenizer.chat_template = (
        "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n{% endfor %}"
    )
    data = LongContextData(chat_tokenizer, text, min_gap=MIN_GAP, chat_fraction=1.0)
    sample = data.generate("passkey", 600, 1)
    decoded = as_bytes(sample["input_ids"]).decode(errors="replace")
    assert decoded.startswith("<|user|>\n") and "<|end|>\n<|assistant|>\n" in decoded
    assert len(sample["input_ids"]) == 600 and decoded.endswith(" " + sample["answer"])


def test_the_mix_draws_only_weighted_kinds_and_refuses_unknown_ones():
    mix = Mix({"passkey": 1.0, "kv_lookup": 3.0, "language_modelling": 0.0})
    rng = random.Random(0)
    drawn = [mix.choose(rng) for _ in range(400)]
    assert set(drawn) == {"passkey", "kv_lookup"} and 0.65 < drawn.count("kv_lookup") / 400 < 0.85
    with pytest.raises(ValueError, match="Unknown sample kinds"):
        Mix({"needles": 1.0})
    with pytest.raises(ValueError, match="positive sum"):
        Mix({"passkey": 0.0})


def test_the_length_curriculum_ramps_from_start_to_end():
    curriculum = LengthCurriculum(start=512, end=2048, ramp_steps=100, multiple_of=64)
    lengths = [curriculum.length(step) for step in range(130)]
    assert lengths[0] == 512 and lengths[100:] == [2048] * 30
    assert lengths == sorted(lengths) and all(n % 64 == 0 for n in lengths)
    assert LengthCurriculum(start=512, end=1000, ramp_steps=0).length(0) == 1000


def test_the_stream_rebuilds_any_step_and_checks_its_state(data):
    stream = LongContextStream(
        data, Mix({"passkey": 1, "language_modelling": 1}), LengthCurriculum(300, 400, 4, 50), 3
    )
    first = [stream.next_batch() for _ in range(3)]
    assert [len(b[0]["input_ids"]) for b in first] == [300, 300, 350]
    assert stream.batch(1) == first[1] and stream.state_dict()["next_step"] == 3
    other = LongContextStream(data, stream.mix, stream.curriculum, 3)
    other.load_state_dict(stream.state_dict())
    assert other.next_batch() == stream.next_batch()
    with pytest.raises(ValueError, match="seed"):
        LongContextStream(data, stream.mix, stream.curriculum, 3, seed=1).load_state_dict(stream.state_dict())


def test_clean_doc_text_keeps_the_prose_and_drops_the_markup():
    rst = (
        ":mod:`functools` --- Higher-order functions\n"
        "==========================================\n\n"
        ".. module:: functools\n   :synopsis: Higher-order functions.\n\n"
        "The :func:`lru_cache` decorator, see `memoize <https://example.org>`_ and ``maxsize``::\n\n"
        "   @cache\n\n.. versionadded:: 3.9\n"
    )
    cleaned = clean_doc_text(rst)
    assert "functools --- Higher-order functions" in cleaned and "The lru_cache decorator, see memoize" in cleaned
    assert "maxsize:" in cleaned and "New in version 3.9." in cleaned
    for markup in (":func:", "``", "====", ".. module", ":synopsis:", "https://"):
        assert markup not in cleaned, markup


@pytest.mark.skipif(python_docs_root() is None, reason="the Python documentation (python3.11-doc) is not installed")
def test_the_python_docs_hold_out_whatsnew_and_every_tenth_library_page():
    train, held_out, everything = python_docs_files("train"), python_docs_files("eval"), python_docs_files("all")
    assert not set(train) & set(held_out) and sorted(train + held_out) == sorted(everything)
    root = python_docs_root()
    relative = {Path(p).relative_to(root).as_posix() for p in held_out}
    assert any(p.startswith("whatsnew/") for p in relative)
    assert not any(Path(p).relative_to(root).as_posix().startswith("whatsnew/") for p in train)
    library = sorted(Path(p).relative_to(root).as_posix() for p in everything if "/library/" in p)
    assert {p for p in relative if p.startswith("library/")} == set(library[9::10])
    assert python_docs_files("eval") == held_out  # fixed: the same on every call
