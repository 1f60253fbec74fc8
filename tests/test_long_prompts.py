"""Prompts longer than config.max_position_embeddings (issue 18, item 18, the text-generation pipeline part).

generate() treats max_position_embeddings as the context of a bounded model: it caps a default max_length there (a
longer prompt then fails: "Input length of input_ids is ..., but `max_length` is set to ...") and warns once a
generation passes it. LlamaMem reads any length (the window and the memory), so neither applies to it."""

import pytest
import torch
from transformers import ByT5Tokenizer, pipeline
from transformers.testing_utils import CaptureLogger
from transformers.utils import logging

from .helpers import tiny_model

PROMPT = "This is a test" * 50  # 700 bytes


@pytest.fixture
def bounded():
    tokenizer = ByT5Tokenizer()
    model = tiny_model(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, max_position_embeddings=64)
    return model, tokenizer


def capture_transformers_warnings():
    logging.get_logger("transformers").warning_once.cache_clear()  # a once-only warning seen earlier shows again
    return CaptureLogger(logging.get_logger("transformers"))


def test_generate_without_a_length_reads_a_prompt_longer_than_max_position_embeddings(bounded):
    model, tokenizer = bounded
    inputs = tokenizer(PROMPT, return_tensors="pt")
    length = inputs.input_ids.shape[1]
    assert length > 10 * model.config.max_position_embeddings
    with capture_transformers_warnings() as log:
        default = model.generate(**inputs, do_sample=False)
    assert default.shape[1] == length + 20, default.shape  # the default: 20 new tokens, as for a short prompt
    assert torch.equal(default, model.generate(**inputs, max_new_tokens=20, do_sample=False))
    assert "predefined maximum length" not in log.out, log.out
    # an explicit total length is still the user's
    assert model.generate(**inputs, max_length=length + 7, do_sample=False).shape[1] == length + 7


def test_the_text_generation_pipeline_continues_a_prompt_longer_than_max_position_embeddings(bounded):
    model, tokenizer = bounded
    generator = pipeline("text-generation", model=model, tokenizer=tokenizer)
    with capture_transformers_warnings() as log:
        output = generator(PROMPT, max_new_tokens=6, do_sample=False)[0]["generated_text"]
        default = generator(PROMPT, do_sample=False, max_new_tokens=None)[0]["generated_text"]
    expected = model.generate(**tokenizer(PROMPT, return_tensors="pt"), max_new_tokens=6, do_sample=False)
    assert output == tokenizer.decode(expected[0], skip_special_tokens=True)
    assert output.startswith(PROMPT) and len(output) > len(PROMPT)
    assert default.startswith(PROMPT)
    assert "predefined maximum length" not in log.out, log.out
