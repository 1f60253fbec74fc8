"""Surprisal-gated writes (config.memory_write_surprisal_threshold): a token writes into the memory only if the
windowed model (the same weights, memory off) found it surprising. The gate is checked against its definition (a plain
model whose writes are forced shut wherever the windowed model's logits say the token was not surprising), and every
path's promises hold with it: one forward equals chunked prefill plus decode, padding changes nothing, beams and
memory files carry the state."""

import pytest
import torch
import torch.nn.functional as F
from transformers import DynamicCache, StaticCache

from hf_llama_mem import LlamaMemModel, load_memory, save_memory
from hf_llama_mem.modeling_llama_mem import CACHE_FIELD
from hf_llama_mem.surprisal_writes import gate_state_layer

from .helpers import assert_close, tiny_config, tiny_model

WINDOW = 8


def own_surprisal(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """-log p(token | before) from a forward's own logits [B, T, V]; the first token gets 0 (no prediction)."""
    nll = -F.log_softmax(logits[:, :-1].double(), -1).gather(-1, ids[:, 1:, None])[..., 0]
    return torch.cat([nll.new_zeros(ids.shape[0], 1), nll], dim=1)


def gated_pair(threshold=None):
    """The same weights twice: without the threshold, and with it (at the median surprisal of the first, unless
    given). The memory parameters are random, so every write and read matters."""
    torch.manual_seed(0)
    plain = tiny_model()
    with torch.no_grad():
        for name, param in plain.named_parameters():
            if ".memory." in name:
                param.normal_(0, 0.5)
    ids = torch.randint(1, 256, (2, 6 * WINDOW + 3))
    if threshold is None:
        with torch.no_grad():
            threshold = own_surprisal(plain(ids).logits, ids).median().item()
    gated = tiny_model(memory_write_surprisal_threshold=threshold)
    gated.load_state_dict(plain.state_dict())
    return plain, gated, ids, threshold


class ForcedWrites:
    """Forces the write strength of every token outside `keep` [B, T] to zero on a plain model (write logit -inf)."""

    def __init__(self, model, keep):
        self.keep = keep
        self.handles = [
            module.register_forward_hook(self.hook)
            for name, module in model.named_modules()
            if name.endswith("memory.write_proj")
        ]

    def remove(self):
        for handle in self.handles:
            handle.remove()

    def hook(self, module, args, output):
        keep = self.keep[:, : output.shape[1]]  # without a cache only the tokens that leave the window write
        return torch.where(keep[..., None], output, torch.full_like(output, -float("inf")))


def closed(model):
    """The model with every memory read gate at zero: the windowed model, exactly."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(".memory.gate"):
                param.zero_()
    return model


def test_a_token_writes_exactly_when_the_windowed_models_surprisal_exceeds_the_threshold():
    plain, gated, ids, threshold = gated_pair()
    windowed = tiny_model()
    windowed.load_state_dict(plain.state_dict())
    with torch.no_grad():
        logits = gated(ids).logits
        writes = own_surprisal(closed(windowed)(ids).logits, ids) > threshold
        assert 0 < writes[:, :-WINDOW].sum() < writes[:, :-WINDOW].numel()  # the gate decides both ways
        forced = ForcedWrites(plain, writes)
        assert_close(logits, plain(ids).logits, atol=1e-5, what="gated model vs writes forced by windowed surprisal")
        forced.remove()
        everything = plain(ids).logits
        own = own_surprisal(logits, ids) > threshold
    assert (logits - everything).abs().max() > 1e-2  # the gated writes are not all writes
    assert not torch.equal(own[:, :-WINDOW], writes[:, :-WINDOW])  # and not decided by the model's own surprisal


def test_a_threshold_above_every_surprisal_is_the_windowed_model():
    plain, gated, ids, _ = gated_pair(threshold=1e6)
    with torch.no_grad():
        assert_close(gated(ids).logits, closed(plain)(ids).logits, atol=1e-5, what="no writes vs closed gates")


def test_one_forward_equals_chunked_prefill_plus_decode():
    _, gated, ids, _ = gated_pair()
    with torch.no_grad():
        whole = gated(ids, use_cache=False).logits
        cache = DynamicCache(config=gated.config)
        pieces, start = [], 0
        for size in (13, 3, 1, 20):  # a prefill longer than the window, shorter pieces, then decode steps
            pieces.append(gated(ids[:, start : start + size], use_cache=True, **{CACHE_FIELD: cache}).logits)
            start += size
        while start < ids.shape[1]:
            pieces.append(gated(ids[:, start : start + 1], use_cache=True, **{CACHE_FIELD: cache}).logits)
            start += 1
    assert_close(torch.cat(pieces, dim=1), whole, atol=1e-5, what="prefill + decode vs one forward")


@pytest.mark.parametrize("keep", [1, WINDOW + 2, "positions"])
def test_logits_to_keep_gives_those_positions_of_the_whole_forward(keep):
    """The LM head runs only where logits are kept: the last k positions (here also more than one piece of W - 1) or
    chosen ones are those of the forward that keeps every position."""
    _, gated, ids, _ = gated_pair()
    positions = torch.tensor([0, WINDOW - 1, 3 * WINDOW, ids.shape[1] - 1])
    with torch.no_grad():
        whole = gated(ids, use_cache=False).logits
        kept = gated(ids, use_cache=False, logits_to_keep=positions if keep == "positions" else keep).logits
    expected = whole[:, positions] if keep == "positions" else whole[:, -keep:]
    assert_close(kept, expected, atol=1e-5, what=f"logits_to_keep={keep}")


def test_left_padding_changes_nothing():
    _, gated, ids, _ = gated_pair()
    short = ids[:1, 5:]
    padded = torch.cat([torch.zeros(1, 5, dtype=torch.long), short], dim=1)
    batch = torch.cat([padded, ids[1:]], dim=0)
    mask = torch.ones_like(batch)
    mask[0, :5] = 0
    with torch.no_grad():
        together = gated(batch, attention_mask=mask).logits
        assert_close(together[0, 5:], gated(short).logits[0], atol=1e-5, what="padded row vs alone")
        assert_close(together[1], gated(ids[1:]).logits[0], atol=1e-5, what="unpadded row vs alone")


def test_greedy_and_beam_generation_follow_the_forward():
    _, gated, ids, _ = gated_pair()
    prompt = ids[:, :20]
    out = gated.generate(prompt, max_new_tokens=30, do_sample=False)
    with torch.no_grad():
        loop = prompt
        for _ in range(30):
            loop = torch.cat([loop, gated(loop).logits[:, -1:].argmax(-1)], dim=1)
    assert torch.equal(out, loop)
    beams = dict(max_new_tokens=20, num_beams=3, do_sample=False, num_return_sequences=2)
    assert torch.equal(gated.generate(prompt, **beams), gated.generate(prompt, use_cache=False, **beams))


@pytest.mark.parametrize("padded", [True, False])
def test_a_fixed_shape_cache_gives_what_the_dynamic_cache_gives(padded):
    """A StaticCache (compiled decoding's): the gate's state lives in fixed-shape tensors too, so prefill plus decode
    steps from inside the first window to past the fifth equal the dynamic cache's, left-padded or without a mask;
    after reset() (in place: the windowed pass's cache and the kept prediction too) the same cache gives them again."""
    _, gated, ids, _ = gated_pair()
    mask = torch.ones_like(ids)
    mask[0, :3] = 0

    def prefill_and_decode(cache):
        def step(start, end):
            step_mask = mask[:, :end] if padded else None
            with torch.no_grad():
                return gated(ids[:, start:end], attention_mask=step_mask, use_cache=True, **{CACHE_FIELD: cache})

        return torch.cat([step(0, 5).logits] + [step(t, t + 1).logits for t in range(5, ids.shape[1])], dim=1)

    expected = prefill_and_decode(DynamicCache(config=gated.config))
    static = StaticCache(config=gated.config, max_cache_len=64)
    assert_close(prefill_and_decode(static), expected, atol=1e-5, what="static vs dynamic cache")
    static.reset()
    gate = gate_state_layer(static)  # a first token is not gated by the last call's prediction: surprisal 0
    assert not gate.next_token_log_probs.any() and gate.windowed_cache.get_seq_length() == 0
    assert_close(prefill_and_decode(static), expected, atol=1e-5, what="static cache after reset()")


def test_a_compiled_fixed_shape_decode_step_is_one_graph_and_generates_what_eager_generates():
    """generate(cache_implementation="static", compile_config=...) with the gate: the decode steps (the windowed
    pass, the model and the gate) run one compiled graph, without a host read, token for token eager greedy
    decoding's, for a left-padded batch; a second call (a new cache) runs the same graph."""
    from torch._dynamo.utils import counters
    from transformers import CompileConfig

    from .test_compile import RecordingBackend, graphs_compiled

    torch._dynamo.reset()  # what earlier tests compiled does not count here (as test_compile's fresh_dynamo)
    counters.clear()
    _, gated, ids, _ = gated_pair()
    prompt = ids[:, :12]
    mask = torch.ones_like(prompt)
    mask[0, :4] = 0
    kwargs = dict(
        attention_mask=mask, max_new_tokens=30, do_sample=False, output_logits=True, return_dict_in_generate=True
    )
    expected = gated.generate(prompt, **kwargs)
    backend = RecordingBackend()
    config = CompileConfig(backend=backend, fullgraph=True, mode=None)
    config._compile_all_devices = True  # generate() compiles only on accelerators unless told (transformers' flag)
    for _ in range(2):
        got = gated.generate(prompt, cache_implementation="static", compile_config=config, **kwargs)
        assert torch.equal(got.sequences, expected.sequences)
        for step, (a, b) in enumerate(zip(got.logits, expected.logits, strict=True)):
            assert_close(a, b, atol=1e-5, what=f"logits of step {step}")
    assert graphs_compiled() == 1 and not backend.host_reads()
    torch._dynamo.reset()


def test_beams_reorder_the_gate_state_of_a_fixed_shape_cache():
    _, gated, ids, _ = gated_pair()
    beams = dict(max_new_tokens=20, num_beams=3, do_sample=False, num_return_sequences=2)
    prompt = ids[:, :20]
    assert torch.equal(
        gated.generate(prompt, cache_implementation="static", **beams),
        gated.generate(prompt, use_cache=False, **beams),
    )


def test_a_memory_file_keeps_the_gate_state_and_continues_exactly(tmp_path):
    # 30 tokens: the file is written mid-piece (pieces of W - 1 = 7), and the first token after the load is gated by
    # the windowed prediction the file kept; the continuation is longer than W, so its writes reach the logits.
    _, gated, ids, _ = gated_pair()
    with torch.no_grad():
        original = DynamicCache(config=gated.config)
        gated(ids[:, :30], use_cache=True, **{CACHE_FIELD: original})
        save_memory(original, tmp_path / "memory.safetensors", model=gated)
        restored = load_memory(tmp_path / "memory.safetensors", gated)
        from_restored = gated(ids[:, 30:], use_cache=True, **{CACHE_FIELD: restored}).logits
        from_original = gated(ids[:, 30:], use_cache=True, **{CACHE_FIELD: original}).logits
        full = gated(ids).logits[:, 30:]
    assert torch.equal(from_restored, from_original)
    assert_close(from_restored, full, atol=1e-5, what="restored vs one forward")


def test_a_memory_file_of_gated_writes_is_refused_by_a_model_without_them_and_back(tmp_path):
    plain, gated, ids, threshold = gated_pair()
    with torch.no_grad():
        for model, name in ((gated, "gated"), (plain, "plain")):
            cache = DynamicCache(config=model.config)
            model(ids[:, :30], use_cache=True, **{CACHE_FIELD: cache})
            save_memory(cache, tmp_path / f"{name}.safetensors", model=model)
    with pytest.raises(ValueError, match="holds the state of surprisal-gated writes .*_threshold=None"):
        load_memory(tmp_path / "gated.safetensors", plain)
    with pytest.raises(ValueError, match=f"has no state of surprisal-gated writes .*_threshold={threshold}"):
        load_memory(tmp_path / "plain.safetensors", gated)


def test_gradients_reach_the_memory_through_the_pieces():
    _, gated, ids, _ = gated_pair()
    gated.train()
    loss = gated(ids, labels=ids).loss
    loss.backward()
    write = gated.model.layers[0].self_attn.memory.write_proj.weight.grad
    assert write is not None and write.abs().max() > 0


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (-1.0, "a number of nats >= 0, got -1.0"),
        (float("nan"), "a number of nats >= 0, got nan"),
        (float("inf"), "must be finite, got inf"),
    ],
)
def test_a_bad_threshold_is_refused_by_name(value, message):
    with pytest.raises(ValueError, match=message):
        tiny_config(memory_write_surprisal_threshold=value)


def test_a_threshold_of_the_wrong_type_is_refused_by_name():
    with pytest.raises(TypeError, match="memory_write_surprisal_threshold"):
        tiny_config(memory_write_surprisal_threshold=True)


def test_a_window_of_one_is_refused_with_a_threshold():
    with pytest.raises(ValueError, match="needs sliding_window >= 2"):
        tiny_config(memory_write_surprisal_threshold=2.0, sliding_window=1)


def test_what_cannot_compute_a_surprisal_is_refused():
    _, gated, ids, _ = gated_pair()
    with pytest.raises(ValueError, match="run LlamaMemForCausalLM"):
        LlamaMemModel(gated.config)(ids)
    with pytest.raises(ValueError, match="needs input_ids"):
        gated(inputs_embeds=gated.get_input_embeddings()(ids))
    gated.gradient_checkpointing_enable()
    gated.train()
    with pytest.raises(ValueError, match="gradient checkpointing"):
        gated(ids, labels=ids)


# ---- in the recipe: extend trains with the gate and records it; a conversion takes it from the delta ----


def test_extend_trains_with_surprisal_writes_and_the_delta_carries_the_threshold(tmp_path):
    from transformers import ByT5Tokenizer, LlamaConfig, LlamaForCausalLM

    from hf_llama_mem import LlamaMemForCausalLM
    from hf_llama_mem.convert_llama import convert_checkpoint
    from hf_llama_mem.extend import ExtendSettings, apply_delta, delta_conversion, extend

    from .helpers import TINY_DIMS
    from .test_extend import SETTINGS

    source = tmp_path / "llama"
    torch.manual_seed(0)
    config = LlamaConfig(**{**TINY_DIMS, "vocab_size": 384}, pad_token_id=0, bos_token_id=None, eos_token_id=1)
    LlamaForCausalLM(config).save_pretrained(source)
    ByT5Tokenizer().save_pretrained(source)
    settings = ExtendSettings(**{**SETTINGS, "steps": 2, "memory_write_surprisal_threshold": 1.5})
    delta = extend(str(source), tmp_path / "run", settings)
    assert delta_conversion(delta)["memory_write_surprisal_threshold"] == 1.5
    # Its tensors apply to a model that writes every token too: the threshold is not part of what must match.
    conversion = {**delta_conversion(delta), "memory_write_surprisal_threshold": None}
    apply_delta(LlamaMemForCausalLM.from_llama(str(source), **conversion), delta)
    convert_checkpoint(str(source), tmp_path / "gated", delta=str(delta))
    assert LlamaMemForCausalLM.from_pretrained(tmp_path / "gated").config.memory_write_surprisal_threshold == 1.5
    convert_checkpoint(str(source), tmp_path / "all", delta=str(delta), memory_write_surprisal_threshold=None)
    assert LlamaMemForCausalLM.from_pretrained(tmp_path / "all").config.memory_write_surprisal_threshold is None
