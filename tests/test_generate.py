import torch

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
