"""The memory's own low-rank query and key corrections (config.memory_projection_rank): they start at zero, every
computation path applies them the same way, and they change only what the memory reads and writes."""

import pytest
import torch

from hf_llama_mem import LlamaMemForCausalLM

from .helpers import assert_close, tiny_config, tiny_model
from .test_cache import incremental_logits

RANK = 4


def with_random_corrections(model: LlamaMemForCausalLM) -> LlamaMemForCausalLM:
    """Nonzero up projections, as after training: a zero one would hide a path that forgot the correction."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("_correction.up"):
                param.copy_(torch.randn(param.shape, generator=generator) * 0.5)
    return model


def test_corrections_start_at_zero_so_the_model_equals_one_without_them():
    torch.manual_seed(0)
    plain = tiny_model()
    corrected = LlamaMemForCausalLM(tiny_config(memory_projection_rank=RANK)).eval()
    missing, unexpected = corrected.load_state_dict(plain.state_dict(), strict=False)
    assert unexpected == [] and all("_correction." in name for name in missing) and missing
    ids = torch.randint(1, 256, (2, 60))
    with torch.no_grad():
        assert_close(corrected(ids).logits, plain(ids).logits, 0.0, "logits")


@pytest.mark.parametrize("rule", ["gated_delta", "delta"])
@pytest.mark.parametrize("splits", [[1], [8], [5, 40]], ids=lambda s: "prefill" + "-".join(map(str, s)))
def test_forward_equals_prefill_plus_decode_with_corrections(rule, splits):
    model = with_random_corrections(tiny_model(memory_rule=rule, memory_projection_rank=RANK))
    ids = torch.randint(1, 256, (2, 70))
    with torch.no_grad():
        full = model(ids).logits
        incremental, _ = incremental_logits(model, ids, splits)
    assert_close(incremental, full, 1e-4, "logits")


def test_corrections_change_the_memory_only():
    """Within the window the memory reads nothing, so trained corrections leave those logits exactly alone; beyond
    it they change what the memory reads."""
    torch.manual_seed(0)
    model = tiny_model(memory_projection_rank=RANK)
    ids = torch.randint(1, 256, (1, 40))
    with torch.no_grad():
        before = model(ids).logits
        after = with_random_corrections(model)(ids).logits
    window = model.config.sliding_window
    assert_close(after[:, :window], before[:, :window], 0.0, "logits within the window")
    assert (after[:, window:] - before[:, window:]).abs().max() > 1e-3


def test_left_padding_changes_nothing_with_corrections():
    model = with_random_corrections(tiny_model(memory_projection_rank=RANK))
    ids = torch.randint(1, 256, (1, 50))
    pad = 13
    batch = torch.cat([torch.randint(1, 256, (1, pad)), ids], 1)
    mask = torch.ones_like(batch)
    mask[0, :pad] = 0
    with torch.no_grad():
        alone = model(ids).logits
        padded = model(batch, attention_mask=mask).logits[:, pad:]
    assert_close(padded, alone, 1e-4, "padded forward")


def test_gradients_reach_both_corrections_and_they_are_memory_parameters():
    model = with_random_corrections(tiny_model(memory_projection_rank=RANK)).train()
    ids = torch.randint(0, 256, (2, 40))
    model(ids, labels=ids).loss.backward()
    corrections = {n: p for n, p in model.named_parameters() if "_correction." in n}
    assert len(corrections) == 2 * 2 * model.config.num_hidden_layers  # query and key, down and up, per layer
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in corrections.values())
    memory = {id(p) for p in model.memory_parameters()}
    assert all(id(p) in memory for p in corrections.values())


def test_negative_rank_is_refused():
    with pytest.raises(ValueError, match="memory_projection_rank must be >= 0, got -1"):
        tiny_config(memory_projection_rank=-1)


def test_static_cache_generation_applies_the_corrections_too():
    """The fixed-shape decode layers (cache_implementation="static") read and write through the same corrections."""
    model = with_random_corrections(tiny_model(memory_projection_rank=RANK))
    prompt = torch.randint(1, 256, (2, 20))
    kwargs = dict(max_new_tokens=20, do_sample=False)
    expected = model.generate(prompt, **kwargs)
    assert torch.equal(model.generate(prompt, cache_implementation="static", **kwargs), expected)
