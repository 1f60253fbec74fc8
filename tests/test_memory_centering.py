"""The memory's centring offsets (config.memory_centering): they start at zero, every computation path applies them
the same way, `calibrate_centering` centres the keys and queries on the text it is given, and `extend` calibrates a
conversion's offsets and records the setting in its delta."""

import pytest
import torch

from hf_llama_mem import LlamaMemForCausalLM
from hf_llama_mem.extend import ExtendSettings, calibrate_centering, delta_conversion, extend, read_delta_metadata

from .helpers import assert_close, tiny_config, tiny_model
from .test_cache import incremental_logits
from .test_extend import SETTINGS, one_thread, source  # noqa: F401 (fixtures)

OFFSETS = (".memory.key_offset", ".memory.query_offset")


def with_random_offsets(model: LlamaMemForCausalLM) -> LlamaMemForCausalLM:
    """Nonzero offsets, as after calibration: a zero one would hide a path that forgot them."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(OFFSETS):
                param.copy_(torch.randn(param.shape, generator=generator))
    return model


def test_offsets_start_at_zero_so_the_model_equals_one_without_them():
    torch.manual_seed(0)
    plain = tiny_model()
    centred = LlamaMemForCausalLM(tiny_config(memory_centering=True)).eval()
    missing, unexpected = centred.load_state_dict(plain.state_dict(), strict=False)
    assert unexpected == [] and missing and all(name.endswith(OFFSETS) for name in missing)
    ids = torch.randint(1, 256, (2, 60))
    with torch.no_grad():
        assert_close(centred(ids).logits, plain(ids).logits, 0.0, "logits")


@pytest.mark.parametrize("rule", ["gated_delta", "delta"])
@pytest.mark.parametrize("splits", [[1], [8], [5, 40]], ids=lambda s: "prefill" + "-".join(map(str, s)))
def test_forward_equals_prefill_plus_decode_with_offsets(rule, splits):
    model = with_random_offsets(tiny_model(memory_rule=rule, memory_centering=True, memory_projection_rank=2))
    ids = torch.randint(1, 256, (2, 70))
    with torch.no_grad():
        full = model(ids).logits
        incremental, _ = incremental_logits(model, ids, splits)
    assert_close(incremental, full, 1e-4, "logits")


def test_offsets_change_the_memory_only_and_padding_changes_nothing():
    torch.manual_seed(0)
    model = tiny_model(memory_centering=True)
    ids = torch.randint(1, 256, (1, 40))
    with torch.no_grad():
        before = model(ids).logits
        after = with_random_offsets(model)(ids).logits
        window = model.config.sliding_window
        assert_close(after[:, :window], before[:, :window], 0.0, "logits within the window")
        assert (after[:, window:] - before[:, window:]).abs().max() > 1e-3
        pad = 13
        batch = torch.cat([torch.randint(1, 256, (1, pad)), ids], 1)
        mask = torch.ones_like(batch)
        mask[0, :pad] = 0
        assert_close(model(batch, attention_mask=mask).logits[:, pad:], after, 1e-4, "padded forward")


def test_static_cache_generation_applies_the_offsets_too():
    model = with_random_offsets(tiny_model(memory_centering=True))
    prompt = torch.randint(1, 256, (2, 20))
    kwargs = dict(max_new_tokens=20, do_sample=False)
    assert torch.equal(model.generate(prompt, cache_implementation="static", **kwargs), model.generate(prompt, **kwargs))


def test_gradients_reach_the_offsets_and_they_are_memory_parameters():
    model = with_random_offsets(tiny_model(memory_centering=True)).train()
    ids = torch.randint(0, 256, (2, 40))
    model(ids, labels=ids).loss.backward()
    offsets = {n: p for n, p in model.named_parameters() if n.endswith(OFFSETS)}
    assert len(offsets) == 2 * model.config.num_hidden_layers
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in offsets.values())
    memory = {id(p) for p in model.memory_parameters()}
    assert all(id(p) in memory for p in offsets.values())


def test_calibration_centres_the_memory_keys_and_queries_on_its_text():
    """Exactly, with the gates closed (as after a conversion): then no layer's statistics depend on the reads."""
    model = with_random_offsets(tiny_model(memory_centering=True, memory_projection_rank=2))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(".memory.gate"):
                param.zero_()
    ids = torch.randint(1, 256, (1, 80))
    keys, queries = {}, {}
    for index, layer in enumerate(model.model.layers):
        memory = layer.self_attn.memory
        memory.key_conv.register_forward_hook(lambda m, a, out, i=index: keys.__setitem__(i, out))
        memory.register_forward_hook(
            lambda m, a, out, i=index: queries.__setitem__(i, a[2] + m.query_correction(a[1])) if a[0] == "read" else None
        )
    calibrate_centering(model, ids)
    with torch.no_grad():
        model(ids, use_cache=False)
    for index, layer in enumerate(model.model.layers):
        memory = layer.self_attn.memory
        key = keys[index].view(1, *memory.key_offset.shape, -1) + memory.key_offset[None, :, :, None]
        query = queries[index] + memory.query_offset[None, :, None]
        assert key.mean(dim=(0, 3)).abs().max() < 1e-5 and query.mean(dim=(0, 2)).abs().max() < 1e-5
        assert memory.key_offset.abs().max() > 1e-3  # the text's keys were not centred before
    with pytest.raises(ValueError, match="memory_centering=True"):
        calibrate_centering(tiny_model(), ids)


def test_extend_calibrates_a_conversion_and_records_the_setting(source, tmp_path):  # noqa: F811
    delta = extend(source, tmp_path, ExtendSettings(**{**SETTINGS, "steps": 1, "memory_centering": True}))
    assert read_delta_metadata(delta)["memory_centering"] is True
    conversion = delta_conversion(delta)
    assert conversion["memory_centering"] is True
    model = LlamaMemForCausalLM.from_llama(source, **conversion)
    from hf_llama_mem.extend import apply_delta

    apply_delta(model, delta)
    offsets = [p for n, p in model.named_parameters() if n.endswith(OFFSETS)]
    assert offsets and all(p.abs().max() > 0 for p in offsets)
