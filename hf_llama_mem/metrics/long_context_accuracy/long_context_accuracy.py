"""Exact-match accuracy of long-context answers (passkeys, recalled values), overall and per distance.

Each prediction is the model's answer (e.g. the greedy continuation after "The pass key is"), each reference the
right one, each distance how far the answer's evidence was from the question (or the context length): the result
shows where accuracy falls off.
"""

import datasets
import evaluate

_DESCRIPTION = __doc__
_KWARGS_DESCRIPTION = """
Args:
    predictions (list of str): the model's answers (compared after stripping surrounding whitespace).
    references (list of str): the right answers.
    distances (list of int): per answer, the distance between evidence and question (or the context length).
Returns:
    accuracy: overall exact-match accuracy; by_distance: {distance: accuracy}; count_by_distance.
Example:
    >>> metric = evaluate.load(metric_path("long_context_accuracy"))
    >>> metric.compute(predictions=["71432", "1"], references=["71432", "2"], distances=[1024, 4096])
    {'accuracy': 0.5, 'by_distance': {1024: 1.0, 4096: 0.0}, 'count_by_distance': {1024: 1, 4096: 1}}
"""
_CITATION = ""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class LongContextAccuracy(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {
                    "predictions": datasets.Value("string"),
                    "references": datasets.Value("string"),
                    "distances": datasets.Value("int64"),
                }
            ),
        )

    def _compute(self, predictions, references, distances):
        correct, total = {}, {}
        for prediction, reference, distance in zip(predictions, references, distances, strict=True):
            total[distance] = total.get(distance, 0) + 1
            correct[distance] = correct.get(distance, 0) + int(prediction.strip() == reference.strip())
        return {
            "accuracy": sum(correct.values()) / max(sum(total.values()), 1),
            "by_distance": {d: correct[d] / total[d] for d in sorted(total)},
            "count_by_distance": {d: total[d] for d in sorted(total)},
        }
