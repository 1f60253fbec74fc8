"""The model's causal-LM loss equals transformers' ForCausalLMLoss in value and gradient, in each form Trainer uses."""

import pytest
import torch
from transformers.loss.loss_utils import ForCausalLMLoss

from hf_llama_mem import causal_lm_loss as loss_module
from hf_llama_mem.causal_lm_loss import causal_lm_loss

from .helpers import assert_close, tiny_model

VOCAB = 50


def loss_and_grad(loss_function, logits, labels, **kwargs):
    logits = logits.detach().requires_grad_()
    loss = loss_function(logits=logits, labels=labels, vocab_size=VOCAB, **kwargs)
    (3.0 * loss).backward()  # a non-unit upstream gradient reaches the scaling of the backward
    return loss, logits.grad


@pytest.fixture(autouse=True)
def small_blocks(monkeypatch):
    # 2 rows a block: several blocks and a short last one over the 2 x 7 rows below.
    monkeypatch.setattr(loss_module, "BLOCK_ELEMENTS", 2 * VOCAB)


def labels_with_ignored_rows(ignore_index=-100):
    labels = torch.randint(0, VOCAB, (2, 7))
    labels[0, :2] = ignore_index  # left padding
    labels[1, 4] = ignore_index
    return labels


@pytest.mark.parametrize(
    "kwargs",
    [{}, {"num_items_in_batch": torch.tensor(9)}, {"num_items_in_batch": 4}, {"ignore_index": 7}],
    ids=["mean", "num_items_tensor", "num_items_int", "other_ignore_index"],
)
def test_values_and_gradients_equal_transformers_loss(kwargs):
    logits, labels = 4 * torch.randn(2, 7, VOCAB), labels_with_ignored_rows(kwargs.get("ignore_index", -100))
    loss, grad = loss_and_grad(causal_lm_loss, logits, labels, **kwargs)
    expected_loss, expected_grad = loss_and_grad(ForCausalLMLoss, logits, labels, **kwargs)
    assert loss.dtype == torch.float32
    assert_close(loss, expected_loss, atol=1e-5, what="loss")
    assert_close(grad, expected_grad, atol=1e-6, what="gradient")


def test_shift_labels_given_are_used_as_they_are():
    logits, shift_labels = torch.randn(2, 7, VOCAB), labels_with_ignored_rows()
    kwargs = {"shift_labels": shift_labels, "labels": None}
    logits = logits.requires_grad_()
    loss = causal_lm_loss(logits, vocab_size=VOCAB, **kwargs)
    expected = ForCausalLMLoss(logits, vocab_size=VOCAB, **kwargs)
    assert_close(loss, expected, atol=1e-5, what="loss")


def test_bfloat16_logits_get_a_float32_loss_and_a_bfloat16_gradient():
    logits, labels = torch.randn(2, 7, VOCAB).bfloat16(), labels_with_ignored_rows()
    loss, grad = loss_and_grad(causal_lm_loss, logits, labels)
    expected_loss, expected_grad = loss_and_grad(ForCausalLMLoss, logits, labels)
    assert (loss.dtype, grad.dtype) == (torch.float32, torch.bfloat16)
    assert_close(loss, expected_loss, atol=1e-5, what="loss")
    assert_close(grad.float(), expected_grad.float(), atol=1e-2, what="gradient")


@pytest.mark.parametrize(
    "kwargs",
    [{}, {"num_items_in_batch": torch.tensor(0)}, {"num_items_in_batch": 0}, {"num_items_in_batch": torch.tensor(5)}],
    ids=["mean", "num_items_zero_tensor", "num_items_zero_int", "num_items_positive"],
)
def test_nothing_counted_gives_the_stock_value_and_finite_zero_gradients(kwargs):
    # transformers' loss: nan (0 / 0) as the mean or over num_items_in_batch=0, 0 over a positive count, and in
    # every case exactly zero gradients (its backward never multiplies inf by 0), so one fully masked batch
    # leaves the weights as they were.
    logits, labels = torch.randn(2, 5, VOCAB), torch.full((2, 5), -100)
    loss, grad = loss_and_grad(causal_lm_loss, logits, labels, **kwargs)
    expected_loss, expected_grad = loss_and_grad(ForCausalLMLoss, logits, labels, **kwargs)
    assert torch.equal(loss.isnan(), expected_loss.isnan()), (loss, expected_loss)
    if not expected_loss.isnan():
        assert_close(loss, expected_loss, atol=0, what="loss")
    assert torch.equal(expected_grad, torch.zeros_like(logits))
    assert torch.equal(grad, expected_grad), "gradients of a fully masked batch must be finite zeros"


def test_a_fully_masked_row_in_a_counted_batch_gets_zero_gradient():
    logits, labels = torch.randn(2, 7, VOCAB), labels_with_ignored_rows()
    labels[1] = -100
    loss, grad = loss_and_grad(causal_lm_loss, logits, labels)
    expected_loss, expected_grad = loss_and_grad(ForCausalLMLoss, logits, labels)
    assert_close(loss, expected_loss, atol=1e-5, what="loss")
    assert_close(grad, expected_grad, atol=1e-6, what="gradient")
    assert torch.equal(grad[1], torch.zeros_like(grad[1]))


def test_a_model_step_on_a_fully_masked_batch_leaves_finite_zero_gradients():
    model = tiny_model().train()
    ids = torch.randint(0, model.config.vocab_size, (2, 12))
    model(ids, labels=torch.full_like(ids, -100)).loss.backward()
    for name, param in model.named_parameters():
        assert param.grad is None or torch.equal(param.grad, torch.zeros_like(param.grad)), name


@pytest.mark.parametrize("bad", [VOCAB, -3])
def test_a_label_outside_the_vocabulary_is_a_value_error_naming_it(bad):
    labels = labels_with_ignored_rows()
    labels[1, 5] = bad
    with pytest.raises(ValueError, match=rf"label {bad} is outside the vocabulary \[0, {VOCAB}\)"):
        causal_lm_loss(torch.randn(2, 7, VOCAB), labels, VOCAB)


def test_the_model_uses_it_and_a_user_loss_function_replaces_it():
    model = tiny_model()
    ids = torch.randint(0, model.config.vocab_size, (2, 12))
    assert model.loss_function is causal_lm_loss
    output = model(ids, labels=ids)
    expected = ForCausalLMLoss(output.logits, ids, model.config.vocab_size)
    assert_close(output.loss, expected, atol=1e-5, what="model loss")

    model.loss_function = lambda logits, labels, vocab_size, **kwargs: logits.sum() * 0 + 42.0
    assert model(ids, labels=ids).loss.item() == 42.0


def test_the_model_trains_on_shift_labels_when_given():
    """Under sequence/context parallelism Trainer passes pre-shifted targets (`shift_labels`), with or without the
    labels they came from: the model's loss is over those, as transformers' loss is (issue 18, item 16)."""
    model = tiny_model()
    ids = torch.randint(1, model.config.vocab_size, (2, 12))
    shifted = torch.nn.functional.pad(ids, (0, 1), value=-100)[:, 1:]
    with torch.no_grad():
        from_labels = model(ids, labels=ids).loss
        alone = model(ids, shift_labels=shifted).loss
        other = shifted.clone()
        other[:, :5] = -100  # a shard's targets: not what `labels` would give, and it is these that count
        both = model(ids, labels=ids, shift_labels=other).loss
        expected = ForCausalLMLoss(model(ids).logits, None, model.config.vocab_size, shift_labels=other)
    assert alone is not None, "shift_labels without labels gave no loss"
    assert_close(alone, from_labels, atol=1e-6, what="loss from shift_labels")
    assert_close(both, expected, atol=1e-5, what="shift_labels over labels")
