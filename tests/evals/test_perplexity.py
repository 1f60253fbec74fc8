import math

import pytest
import torch

from hf_llama_mem.evals.perplexity import PerplexityByPosition, bucket_perplexities, position_buckets

from ..helpers import tiny_model


def test_buckets_double_from_the_window():
    assert position_buckets(8, 50) == [(0, 8), (8, 16), (16, 32), (32, 50)]
    assert position_buckets(64, 40) == [(0, 40)]
    with pytest.raises(ValueError, match="window"):
        position_buckets(0, 10)


def test_bucket_perplexity_is_exp_of_the_mean_loss():
    assert bucket_perplexities([2 * math.log(4), 0.0], [2, 0]) == [pytest.approx(4.0), None]


@pytest.mark.parametrize("segment", [7, 16, 1000])
def test_streamed_losses_equal_one_forward_over_the_document(segment):
    model = tiny_model()
    ids = torch.randint(1, 256, (1, 61))
    with torch.no_grad():
        logits = model(ids).logits[0]
        expected = torch.nn.functional.cross_entropy(logits[:-1], ids[0, 1:], reduction="none")
        streamed = PerplexityByPosition(segment=segment).stream_losses(model, ids, bar=_NoBar())
    assert streamed.shape == expected.shape
    assert (streamed - expected).abs().max() < 1e-4


def test_every_predicted_token_lands_in_exactly_one_bucket():
    model = tiny_model()
    documents = [torch.randint(1, 256, (50,)), torch.randint(1, 256, (40,))]
    result = PerplexityByPosition(max_tokens=40, segment=16).evaluate(model, documents, progress=False)
    assert result["buckets"] == [[0, 8], [8, 16], [16, 32], [32, 40]]
    assert result["tokens"] == [7 * 2, 8 * 2, 16 * 2, 8 * 2] and sum(result["tokens"]) == 2 * 39


class _NoBar:
    def update(self, n):
        pass
