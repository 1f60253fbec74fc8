import copy

import pytest
import torch
from transformers import AutoModel, AutoModelForCausalLM, DynamicCache

from hf_llama_mem import LlamaMemForCausalLM, LlamaMemModel, windowed_attention

from .helpers import assert_close, tiny_config, tiny_model


def test_output_shapes_and_auto_classes():
    config = tiny_config()
    assert isinstance(AutoModelForCausalLM.from_config(config), LlamaMemForCausalLM)
    assert isinstance(AutoModel.from_config(config), LlamaMemModel)
    out = tiny_model()(torch.randint(0, 256, (3, 21)))
    assert out.logits.shape == (3, 21, 256)


def test_all_new_parameters_live_under_memory_prefix():
    names = [n for n, _ in tiny_model().named_parameters()]
    llama_only = [n for n, _ in tiny_model(memory_layers=[]).named_parameters()]
    assert sorted(set(names) - set(llama_only)) == sorted(n for n in names if ".self_attn.memory." in n)


def test_causality():
    model = tiny_model()
    ids = torch.randint(0, 256, (1, 50))
    changed = ids.clone()
    changed[0, 30:] = torch.randint(0, 256, (20,))
    with torch.no_grad():
        assert_close(model(changed).logits[:, :30], model(ids).logits[:, :30], 1e-6, "logits before the change")


@pytest.mark.parametrize("memory_layers, reaches", [(None, True), ([], False)], ids=["memory", "no-memory"])
def test_change_six_windows_back_reaches_last_logits_only_through_memory(memory_layers, reaches):
    model = tiny_model(memory_layers=memory_layers)
    ids = torch.randint(1, 256, (1, 60))
    changed = ids.clone()
    changed[0, 60 - 6 * 8 - 1] = (ids[0, 60 - 6 * 8 - 1] + 1) % 256
    with torch.no_grad():
        delta = (model(changed).logits[0, -1] - model(ids).logits[0, -1]).abs().max().item()
    assert (delta > 1e-4) == reaches, delta


def test_zero_gate_removes_everything_outside_the_window():
    model = tiny_model()
    for layer in model.model.layers:
        layer.self_attn.memory.gate.data.zero_()
    ids = torch.randint(1, 256, (1, 40))
    changed = ids.clone()
    changed[0, :20] = torch.randint(1, 256, (20,))
    with torch.no_grad():
        # Without memory, two layers see 2 * (W - 1) = 14 tokens back: position 39 cannot see tokens < 25.
        assert torch.equal(model(changed).logits[0, -1], model(ids).logits[0, -1])


@pytest.mark.parametrize("rule", ["gated_delta", "delta"])
def test_gradients_reach_every_parameter(rule):
    model = tiny_model(memory_rule=rule).train()
    ids = torch.randint(0, 256, (2, 40))
    model(ids, labels=ids).loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert missing == []


def test_gradient_checkpointing_matches_plain_backward():
    ids = torch.randint(0, 256, (2, 40))
    model = tiny_model().train()
    model(ids, labels=ids).loss.backward()
    plain = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    model.gradient_checkpointing_enable()
    model(ids, labels=ids).loss.backward()
    for name, param in model.named_parameters():
        assert_close(param.grad, plain[name], 1e-5, name)


def test_logits_to_keep_hidden_states_and_tuple_output():
    model = tiny_model()
    ids = torch.randint(0, 256, (2, 12))
    with torch.no_grad():
        full = model(ids, output_hidden_states=True)
        last = model(ids, logits_to_keep=1)
        as_tuple = model(ids, return_dict=False)
    assert last.logits.shape == (2, 1, 256)
    assert_close(last.logits[:, 0], full.logits[:, -1], 1e-6, "last logits")
    assert len(full.hidden_states) == model.config.num_hidden_layers + 1
    assert isinstance(as_tuple, tuple) and torch.equal(as_tuple[0], full.logits)


def test_num_items_in_batch_reaches_the_loss():
    model = tiny_model()
    ids = torch.randint(0, 256, (2, 12))
    with torch.no_grad():
        mean = model(ids, labels=ids).loss
        summed = model(ids, labels=ids, num_items_in_batch=torch.tensor(11.0)).loss
    # the mean is over 2 * 11 shifted labels; num_items_in_batch = 11 divides the same sum by 11 instead
    assert_close(summed, mean * 22 / 11, 1e-5, "loss")


def test_bfloat16_model_gives_the_float32_logits_to_bfloat16_precision():
    model = tiny_model()
    ids = torch.randint(1, 256, (2, 60))  # past several windows: the memory is read
    with torch.no_grad():
        expected = model(ids).logits
        got = copy.deepcopy(model).to(torch.bfloat16)(ids).logits
    assert got.dtype == torch.bfloat16
    # bf16 keeps 8 bits of mantissa (relative steps of 2^-8); measured 0.011 at logits of size 0.65
    assert_close(got.float(), expected, 3e-2, "bf16 logits")


def test_all_ones_mask_read_as_on_an_accelerator_equals_no_mask(monkeypatch):
    """On an accelerator the mask is never read back to the host (that would stall every forward): an all-ones mask
    then runs the padded paths, which must compute what the unpadded fast paths (taken on a CPU) compute."""
    model = tiny_model()
    ids = torch.randint(1, 256, (2, 40))
    with torch.no_grad():
        expected = model(ids).logits
        cache = DynamicCache(config=model.config)
        prefill = model(ids[:, :30], cache=cache, use_cache=True).logits
        decoded = [model(ids[:, t : t + 1], cache=cache, use_cache=True).logits for t in range(30, 40)]
        monkeypatch.setattr(windowed_attention, "known_unpadded", lambda mask: False)
        ones = torch.ones_like(ids)
        assert_close(model(ids, attention_mask=ones).logits, expected, 1e-5, "forward")
        cache = DynamicCache(config=model.config)
        masked_prefill = model(ids[:, :30], attention_mask=ones[:, :30], cache=cache, use_cache=True).logits
        assert_close(masked_prefill, prefill, 1e-5, "prefill")
        for t, logits in zip(range(30, 40), decoded, strict=True):
            step = model(ids[:, t : t + 1], attention_mask=ones[:, : t + 1], cache=cache, use_cache=True).logits
            assert_close(step, logits, 1e-5, f"decode step {t}")


def test_output_attentions_is_refused_clearly():
    model = tiny_model()
    ids = torch.randint(0, 256, (1, 12))
    for forward in (model, model.model):
        with pytest.raises(ValueError, match="output_attentions=True is not supported"):
            forward(ids, output_attentions=True)
    assert model(ids, output_attentions=False).logits.shape == (1, 12, 256)


def test_inputs_embeds_equal_input_ids():
    model = tiny_model()
    ids = torch.randint(0, 256, (2, 30))
    with torch.no_grad():
        assert_close(model(inputs_embeds=model.get_input_embeddings()(ids)).logits, model(ids).logits, 1e-6, "logits")


@pytest.mark.parametrize("bad_id", [256, -1, 10_000])
def test_token_ids_out_of_range_raise(bad_id):
    ids = torch.randint(0, 256, (2, 10))
    ids[1, 4] = bad_id
    with pytest.raises(ValueError, match=rf"Token id {bad_id} is outside \[0, vocab_size=256\)"):
        tiny_model()(ids)


def test_both_or_neither_inputs_raise():
    model = tiny_model()
    ids = torch.randint(0, 256, (1, 4))
    with pytest.raises(ValueError, match="exactly one of input_ids or inputs_embeds"):
        model(ids, inputs_embeds=model.get_input_embeddings()(ids))
    with pytest.raises(ValueError, match="exactly one of input_ids or inputs_embeds"):
        model()


def test_cache_batch_mismatch_raises():
    model = tiny_model()
    cache = DynamicCache(config=model.config)
    model(torch.randint(0, 256, (2, 5)), cache=cache, use_cache=True)
    with pytest.raises(ValueError, match="cache holds a batch of 2 sequences, but the input has 3"):
        model(torch.randint(0, 256, (3, 1)), cache=cache, use_cache=True)


def test_attention_mask_of_wrong_length_raises():
    model = tiny_model()
    with pytest.raises(ValueError, match=r"attention_mask must have shape \[batch, past \+ length\] = \[2, 6\]"):
        model(torch.randint(0, 256, (2, 6)), attention_mask=torch.ones(2, 5, dtype=torch.long))


@pytest.mark.parametrize("rule", ["gated_delta", "delta"])
def test_save_and_load_round_trip_gives_identical_logits(tmp_path, rule):
    model = tiny_model(memory_rule=rule)
    ids = torch.randint(0, 256, (2, 40))
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert isinstance(loaded, LlamaMemForCausalLM)
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)


def left_padded_batch(length: int, pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(1, 256, (2, length))
    mask = torch.ones_like(ids)
    mask[0, :pad] = 0
    return ids, mask


@pytest.mark.gpu
@pytest.mark.parametrize("dtype, atol", [(torch.float32, 1e-4), (torch.bfloat16, 3e-2)], ids=["fp32", "bf16"])
def test_cuda_forward_and_decode_give_the_cpu_float32_logits(dtype, atol):
    """On CUDA (which takes the padded paths for any mask, and expands grouped keys for masked attention), a forward
    and a prefill plus decode give the CPU's float32 logits, to the precision of the dtype."""
    model = tiny_model()
    ids, mask = left_padded_batch(60, pad=9)
    real = mask.bool()
    with torch.no_grad():
        expected = model(ids, attention_mask=mask).logits
        device_model = copy.deepcopy(model).to("cuda", dtype)
        ids, mask = ids.cuda(), mask.cuda()
        full = device_model(ids, attention_mask=mask).logits
        cache = DynamicCache(config=device_model.config)
        pieces = [device_model(ids[:, :40], attention_mask=mask[:, :40], cache=cache, use_cache=True).logits]
        for t in range(40, 60):
            pieces.append(device_model(ids[:, t : t + 1], attention_mask=mask[:, : t + 1], cache=cache).logits)
    assert full.dtype == dtype
    assert_close(full.float().cpu()[real], expected[real], atol, "forward")
    assert_close(torch.cat(pieces, 1).float().cpu()[real], expected[real], atol, "prefill + decode")


@pytest.mark.gpu
def test_cuda_prefill_and_decode_never_wait_on_the_device():
    """No host synchronisation in a forward: torch raises on any synchronising call while the debug mode is on."""
    model = tiny_model().cuda()
    ids, mask = (x.cuda() for x in left_padded_batch(50, pad=5))
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(ids[:, :4], attention_mask=mask[:, :4], cache=cache, use_cache=True)  # lazy initialisations
        torch.cuda.set_sync_debug_mode("error")
        try:
            model(ids[:, 4:40], attention_mask=mask[:, :40], cache=cache, use_cache=True)
            for t in range(40, 50):
                model(ids[:, t : t + 1], attention_mask=mask[:, : t + 1], cache=cache, use_cache=True)
        finally:
            torch.cuda.set_sync_debug_mode("default")
