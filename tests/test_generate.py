import pytest
import torch
from transformers import DynamicCache

from hf_llama_mem.modeling_llama_mem import CACHE_FIELD

from .helpers import tiny_model


def argmax_loop(model, ids, steps):
    """Greedy decoding without any cache: the whole sequence through the model at every step."""
    with torch.no_grad():
        for _ in range(steps):
            ids = torch.cat([ids, model(ids).logits[:, -1:].argmax(-1)], dim=1)
    return ids


def test_greedy_generate_equals_argmax_loop_past_many_windows():
    model = tiny_model()
    prompt = torch.randint(1, 256, (2, 20))
    assert torch.equal(model.generate(prompt, max_new_tokens=40, do_sample=False), argmax_loop(model, prompt, 40))


def test_beam_search_same_with_and_without_cache():
    model = tiny_model()
    prompt = torch.randint(1, 256, (2, 20))
    kwargs = dict(max_new_tokens=20, num_beams=3, do_sample=False, num_return_sequences=2)
    assert torch.equal(model.generate(prompt, **kwargs), model.generate(prompt, use_cache=False, **kwargs))


def test_left_padded_row_generates_what_it_generates_alone():
    model = tiny_model()
    short, long = torch.randint(1, 256, (1, 11)), torch.randint(1, 256, (1, 20))
    batch = torch.cat([torch.cat([torch.zeros(1, 9, dtype=torch.long), short], 1), long], 0)
    mask = torch.ones_like(batch)
    mask[0, :9] = 0
    together = model.generate(batch, attention_mask=mask, max_new_tokens=30, do_sample=False)
    assert torch.equal(together[0, 20:], model.generate(short, max_new_tokens=30, do_sample=False)[0, 11:])
    assert torch.equal(together[1], model.generate(long, max_new_tokens=30, do_sample=False)[0])


def test_sampling_with_several_return_sequences():
    model = tiny_model()
    prompt = torch.randint(1, 256, (2, 10))
    out = model.generate(prompt, max_new_tokens=15, do_sample=True, top_k=20, num_return_sequences=3)
    assert out.shape == (6, 25)
    assert torch.equal(out[:, :10], prompt.repeat_interleave(3, dim=0))


# ---- caches generate() is given or builds (issue 18, items 9, 10, 11) and a disk-offloaded model ----


def prefilled_cache(model, prompt, repeats=1):
    """A cache that has read all of `prompt` but its last token, repeated for `repeats` sequences per row."""
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(prompt[:, :-1], use_cache=True, **{CACHE_FIELD: cache})
    cache.batch_repeat_interleave(repeats)
    return cache


def test_generate_with_a_config_less_dynamic_cache_equals_the_default():
    model = tiny_model()
    prompt = torch.randint(1, 256, (2, 20))
    kwargs = dict(max_new_tokens=15, do_sample=False)
    assert torch.equal(
        model.generate(prompt, **{CACHE_FIELD: DynamicCache()}, **kwargs), model.generate(prompt, **kwargs)
    )


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(num_beams=2, do_sample=False),
        dict(num_beams=2, num_return_sequences=2, do_sample=False),
        dict(do_sample=True, top_k=20, num_return_sequences=2),
    ],
    ids=["beams", "beams-two-returned", "sampling-two-returned"],
)
def test_beams_and_several_sequences_start_from_a_prefilled_cache(kwargs):
    """As with transformers' own models, a prefilled cache repeated with batch_repeat_interleave(n) continues n beams
    or samples per row: the same output as generate() from scratch."""
    model = tiny_model()
    prompt = torch.randint(1, 256, (2, 20))
    kwargs = dict(max_new_tokens=12, **kwargs)
    cache = prefilled_cache(
        model, prompt, repeats=max(kwargs.get("num_beams", 1), kwargs.get("num_return_sequences", 1))
    )
    torch.manual_seed(7)
    expected = model.generate(prompt, **kwargs)
    torch.manual_seed(7)
    assert torch.equal(model.generate(prompt, **{CACHE_FIELD: cache}, **kwargs), expected)


@pytest.mark.parametrize("kwargs", [dict(), dict(num_beams=3), dict(padded=True)], ids=["greedy", "beams", "padded"])
def test_a_static_cache_implementation_generates_what_the_dynamic_cache_generates(kwargs):
    """cache_implementation="static" (transformers' way to ask for a compiled decode step; eager here) runs on
    fixed-shape layers: the same tokens, beam search (reordered in place) and a left-padded batch included."""
    model = tiny_model()
    prompt = torch.randint(1, 256, (2, 12))
    if kwargs.pop("padded", False):
        kwargs["attention_mask"] = torch.ones_like(prompt)
        kwargs["attention_mask"][0, :5] = 0
    kwargs.update(max_new_tokens=20, do_sample=False)
    expected = model.generate(prompt, **kwargs)
    assert torch.equal(model.generate(prompt, cache_implementation="static", **kwargs), expected)


def test_a_model_offloaded_to_disk_generates_what_the_model_generates(tmp_path):
    """With too little memory accelerate keeps whole layers on disk (meta tensors) and loads each module's weights
    in a hook around its forward: every use of a weight, the decode step's included, goes through a module call."""
    from transformers import AutoModelForCausalLM

    model = tiny_model()
    model.save_pretrained(tmp_path / "model")
    layer_bytes = sum(p.numel() * 4 for p in model.model.layers[0].parameters())
    offloaded = AutoModelForCausalLM.from_pretrained(
        tmp_path / "model",
        device_map="auto",
        max_memory={"cpu": int(1.5 * layer_bytes)},
        offload_folder=str(tmp_path / "offload"),
    ).eval()
    assert "disk" in set(offloaded.hf_device_map.values())
    prompt = torch.randint(1, 256, (1, 20))
    kwargs = dict(max_new_tokens=5, do_sample=False)
    assert torch.equal(offloaded.generate(prompt, **kwargs), model.generate(prompt, **kwargs))
