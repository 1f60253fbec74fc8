"""Perplexity by position of long texts, read as a stream through the model's cache (constant memory for LlamaMem).

Unlike evaluate's "perplexity", which truncates each text to the model's maximum length and reads it in one forward,
this reads any length in segments that continue the cache, and reports perplexity per position bucket
([0, W), [W, 2W), [2W, 4W), ...), which shows whether tokens far outside the attention window still help.
"""

import datasets
import evaluate
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from hf_llama_mem.evals.perplexity import PerplexityByPosition

_DESCRIPTION = __doc__
_KWARGS_DESCRIPTION = """
Args:
    predictions (list of str): the texts to score.
    model_id (str): a model folder or hub id (LlamaMem or any causal LM with a cache).
    max_tokens (int): tokens read per text (default 8192); shorter texts fill only the buckets they reach.
    segment (int): tokens per forward through the cache (default 1024).
    window (int): bucket base; default the model's sliding_window.
Returns:
    buckets, perplexity and tokens per bucket, overall perplexity.
Example:
    >>> metric = evaluate.load(metric_path("stream_perplexity"))
    >>> metric.compute(predictions=[long_text], model_id="path/to/model")
"""
_CITATION = ""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class StreamPerplexity(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": datasets.Value("string")}),
        )

    def _compute(self, predictions, model_id, max_tokens=8192, segment=1024, window=None):
        import hf_llama_mem  # noqa: F401  (registers llama_mem with the Auto classes)

        model = AutoModelForCausalLM.from_pretrained(model_id).eval()
        tokenizer = AutoTokenizer.from_pretrained(model_id)
        documents = [torch.tensor(tokenizer(text).input_ids) for text in predictions]
        window = window or getattr(model.config, "sliding_window", None) or 1024
        stream = PerplexityByPosition(max_tokens=max_tokens, segment=segment)
        return stream.evaluate(model, documents, window=window)
