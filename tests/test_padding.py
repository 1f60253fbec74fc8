"""Which padding is exact (issue 18, item 8): left padding, and padding after the last real token of a row; padding
between real tokens would take real tokens' places in the window, so it is refused by name (on CPU masks)."""

import pytest
import torch

from .helpers import assert_close, tiny_model

PAD = 0


def test_interior_padding_is_refused_naming_the_row_and_what_is_exact():
    model = tiny_model()
    ids = torch.randint(1, 256, (2, 30))
    mask = torch.ones_like(ids)
    mask[1, 10:16] = 0  # six pads between real tokens of row 1
    with pytest.raises(ValueError, match=r"row 1 .*between real tokens.*left padding") as error:
        model(ids, attention_mask=mask)
    assert "10" in str(error.value), str(error.value)  # where the pads are


def test_left_and_right_padding_equal_the_rows_unpadded():
    model = tiny_model()
    left, right = torch.randint(1, 256, (1, 23)), torch.randint(1, 256, (1, 17))
    ids = torch.full((2, 30), PAD)
    ids[0, 7:], ids[1, :17] = left[0], right[0]
    mask = (torch.arange(30) >= 7).long()[None].repeat(2, 1)
    mask[1] = (torch.arange(30) < 17).long()
    with torch.no_grad():
        both = model(ids, attention_mask=mask).logits
        assert_close(both[0, 7:], model(left).logits[0], 1e-5, "left-padded row")
        assert_close(both[1, :17], model(right).logits[0], 1e-5, "right-padded row, before its pads")


def test_a_cached_step_after_right_padding_is_interior_padding_and_refused():
    model = tiny_model()
    ids = torch.randint(1, 256, (1, 12))
    mask = torch.ones_like(ids)
    mask[0, 9:] = 0
    with torch.no_grad():
        out = model(ids, attention_mask=mask, use_cache=True)  # right padding: exact for the tokens before it
        cache = out.cache if hasattr(out, "cache") else out.past_key_values
        with pytest.raises(ValueError, match="between real tokens"):
            model(
                torch.tensor([[5]]),
                attention_mask=torch.cat([mask, torch.ones(1, 1, dtype=mask.dtype)], 1),
                cache=cache,
            )


def test_generate_refuses_right_padded_prompts_and_runs_left_padded_ones():
    model = tiny_model()
    prompts = torch.randint(1, 256, (2, 12))
    right_mask = torch.ones_like(prompts)
    right_mask[0, 8:] = 0
    with pytest.raises(ValueError, match="between real tokens"):
        model.generate(prompts.masked_fill(right_mask == 0, PAD), attention_mask=right_mask, max_new_tokens=4)
    left_mask = right_mask.flip(-1)
    left = torch.cat([torch.full((1, 4), PAD), prompts[:1, :8]], 1)
    batch = torch.cat([left, prompts[1:]], 0)
    together = model.generate(batch, attention_mask=left_mask, max_new_tokens=20, do_sample=False)
    alone = model.generate(prompts[:1, :8], max_new_tokens=20, do_sample=False)
    assert torch.equal(together[0, 12:], alone[0, 8:])
