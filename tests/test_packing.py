"""Packed sequences (several sequences in one row, position_ids restarting inside it, no mask: what transformers'
DataCollatorWithFlattening produces) are refused in one line (issue 18, item 17): the window and the memory would
carry from one sequence into the next. Ordinary position_ids still pass."""

import pytest
import torch
from transformers import DataCollatorWithFlattening

from .helpers import assert_close, tiny_model

PACKED = r"packed sequences .*not supported.*DataCollatorWithPadding"


def features(*lengths: int) -> list[dict]:
    generator = torch.Generator().manual_seed(1)
    return [{"input_ids": torch.randint(1, 256, (n,), generator=generator).tolist()} for n in lengths]


@pytest.mark.parametrize(
    "collator_kwargs",
    [
        {},
        {"return_flash_attn_kwargs": True},
        {"return_seq_idx": True},
        {"return_flash_attn_kwargs": True, "return_position_ids": False},
    ],
    ids=["position-ids", "flash-attn-kwargs", "seq-idx", "flash-attn-kwargs-only"],
)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_data_collator_with_flattening_batches_are_refused(collator_kwargs, training):
    model = tiny_model()
    model.train(training)
    batch = DataCollatorWithFlattening(**collator_kwargs)(features(20, 13, 9))
    assert "attention_mask" not in batch and batch["input_ids"].shape == (1, 42)
    with pytest.raises(ValueError, match=PACKED):
        model(**batch)


def test_the_error_names_the_row_and_where_its_positions_restart():
    model = tiny_model()
    positions = torch.cat([torch.arange(12), torch.arange(12)])[None].repeat(2, 1)
    positions[0] = torch.arange(24)
    with pytest.raises(ValueError, match=PACKED) as error:
        model(torch.randint(1, 256, (2, 24)), position_ids=positions)
    assert "row 1" in str(error.value) and "index 12" in str(error.value), str(error.value)


def test_a_restart_among_real_tokens_of_a_padded_batch_is_refused():
    model = tiny_model()
    mask = torch.ones(1, 24, dtype=torch.long)
    mask[0, :4] = 0
    positions = torch.cat([torch.zeros(4, dtype=torch.long), torch.arange(10), torch.arange(10)])[None]
    with pytest.raises(ValueError, match=PACKED):
        model(torch.randint(1, 256, (1, 24)), attention_mask=mask, position_ids=positions)


def test_ordinary_position_ids_pass_and_give_the_default_logits():
    model = tiny_model()
    ids = torch.randint(1, 256, (2, 30))
    with torch.no_grad():
        default = model(ids).logits
        assert_close(model(ids, position_ids=torch.arange(30)[None]).logits, default, 0.0, "arange, broadcast")
        assert_close(model(ids, position_ids=torch.arange(30)[None].repeat(2, 1)).logits, default, 0.0, "arange")
        # left padding: generate()'s positions (cumsum of the mask, pads at 0) and pads at 1 (transformers 5.23)
        mask = torch.ones_like(ids)
        mask[0, :6] = 0
        padded = model(ids, attention_mask=mask).logits
        for pad_position in (0, 1):
            positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, pad_position)
            out = model(ids, attention_mask=mask, position_ids=positions).logits
            assert_close(out, padded, 0.0, f"left-padded positions, pads at {pad_position}")
        # a continuation: positions that start where the cache ends
        out = model(ids[:, :20], use_cache=True)
        cache = out.cache if hasattr(out, "cache") else out.past_key_values
        rest = model(ids[:, 20:], position_ids=torch.arange(20, 30)[None], cache=cache).logits
        assert_close(rest, default[:, 20:], 1e-5, "continuation")


def test_generate_from_left_padded_prompts_still_passes():
    model = tiny_model()
    prompts = torch.randint(1, 256, (2, 12))
    mask = torch.ones_like(prompts)
    mask[0, :5] = 0
    together = model.generate(
        prompts.masked_fill(mask == 0, 0), attention_mask=mask, max_new_tokens=12, do_sample=False
    )
    alone = model.generate(prompts[:1, 5:], max_new_tokens=12, do_sample=False)
    assert torch.equal(together[0, 12:], alone[0, 7:])
