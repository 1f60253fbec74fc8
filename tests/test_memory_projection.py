"""The memory's own parameters: the low-rank corrections of its query and key (config.memory_projection_rank), the
centring offsets (config.memory_centering) and the per-token read gate (config.memory_token_gate). Each starts at
zero, every computation path applies it the same way, and it changes only what the memory reads and writes."""

import pytest
import torch

from hf_llama_mem import LlamaMemForCausalLM

from .helpers import assert_close, tiny_config, tiny_model
from .test_cache import incremental_logits

RANK = 4
CORRECTIONS = ("_correction.down", "_correction.up")
OFFSETS = (".memory.key_offset", ".memory.query_offset")
TOKEN_GATE = (".memory.token_gate",)


def with_random(model: LlamaMemForCausalLM, names: tuple[str, ...]) -> LlamaMemForCausalLM:
    """Random values in the parameters ending with `names`, as after training: a zero one (a correction's up
    projection, an offset) would hide a path that forgot it."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(names):
                param.copy_(torch.randn(param.shape, generator=generator) * 0.5)
    return model


# name: (config fields, parameter names it adds, how many per layer)
KINDS = {
    "corrections": (dict(memory_projection_rank=RANK), CORRECTIONS, 4),
    "offsets": (dict(memory_centering=True), OFFSETS, 2),
    "token_gate": (dict(memory_token_gate=True), TOKEN_GATE, 1),
}
kinds = pytest.mark.parametrize("kind", list(KINDS))


def perturbed_model(kind: str, **config) -> LlamaMemForCausalLM:
    fields, names, _ = KINDS[kind]
    return with_random(tiny_model(**fields, **config), names)


@kinds
def test_they_start_at_zero_so_the_model_equals_one_without_them(kind):
    fields, names, _ = KINDS[kind]
    torch.manual_seed(0)
    plain = tiny_model()
    extended = LlamaMemForCausalLM(tiny_config(**fields)).eval()
    missing, unexpected = extended.load_state_dict(plain.state_dict(), strict=False)
    assert unexpected == [] and missing and all(name.endswith(names) for name in missing)
    ids = torch.randint(1, 256, (2, 60))
    with torch.no_grad():
        assert_close(extended(ids).logits, plain(ids).logits, 0.0, "logits")


@kinds
@pytest.mark.parametrize("rule", ["gated_delta", "delta"])
@pytest.mark.parametrize("splits", [[1], [8], [5, 40]], ids=lambda s: "prefill" + "-".join(map(str, s)))
def test_forward_equals_prefill_plus_decode(kind, rule, splits):
    model = perturbed_model(kind, memory_rule=rule)
    ids = torch.randint(1, 256, (2, 70))
    with torch.no_grad():
        full = model(ids).logits
        incremental, _ = incremental_logits(model, ids, splits)
    assert_close(incremental, full, 1e-4, "logits")


@kinds
def test_they_change_the_memory_only(kind):
    """Within the window the memory reads nothing, so trained values leave those logits exactly alone; beyond it
    they change what the memory reads."""
    fields, names, _ = KINDS[kind]
    torch.manual_seed(0)
    model = tiny_model(**fields)
    ids = torch.randint(1, 256, (1, 40))
    with torch.no_grad():
        before = model(ids).logits
        after = with_random(model, names)(ids).logits
    window = model.config.sliding_window
    assert_close(after[:, :window], before[:, :window], 0.0, "logits within the window")
    assert (after[:, window:] - before[:, window:]).abs().max() > 1e-3


@kinds
def test_left_padding_changes_nothing(kind):
    model = perturbed_model(kind)
    ids = torch.randint(1, 256, (1, 50))
    pad = 13
    batch = torch.cat([torch.randint(1, 256, (1, pad)), ids], 1)
    mask = torch.ones_like(batch)
    mask[0, :pad] = 0
    with torch.no_grad():
        alone = model(ids).logits
        padded = model(batch, attention_mask=mask).logits[:, pad:]
    assert_close(padded, alone, 1e-4, "padded forward")


@kinds
def test_gradients_reach_them_and_they_are_memory_parameters(kind):
    _, names, per_layer = KINDS[kind]
    model = perturbed_model(kind).train()
    ids = torch.randint(0, 256, (2, 40))
    model(ids, labels=ids).loss.backward()
    params = {n: p for n, p in model.named_parameters() if n.endswith(names)}
    assert len(params) == per_layer * model.config.num_hidden_layers
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in params.values())
    memory = {id(p) for p in model.memory_parameters()}
    assert all(id(p) in memory for p in params.values())


@kinds
def test_static_cache_generation_applies_them_too(kind):
    """The fixed-shape decode layers (cache_implementation="static") read and write through the same parameters."""
    model = perturbed_model(kind)
    prompt = torch.randint(1, 256, (2, 20))
    kwargs = dict(max_new_tokens=20, do_sample=False)
    expected = model.generate(prompt, **kwargs)
    assert torch.equal(model.generate(prompt, cache_implementation="static", **kwargs), expected)


def test_negative_rank_is_refused():
    with pytest.raises(ValueError, match="memory_projection_rank must be >= 0, got -1"):
        tiny_config(memory_projection_rank=-1)
