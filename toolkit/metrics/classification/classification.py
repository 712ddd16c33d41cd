"""Accuracy, macro-F1 and per-class precision/recall as an `evaluate` metric kept inside the project.

`evaluate.load("accuracy")` fetches its script from the Hub; this module is loaded by path and works offline.
"""

import datasets
import evaluate
import numpy as np
from sklearn.metrics import precision_recall_fscore_support

_DESCRIPTION = "Accuracy, macro-averaged F1, and per-class precision, recall, F1 and support."
_INPUTS = """
Args:
    predictions: predicted label ids.
    references: true label ids.
    num_labels: number of classes (classes absent from both lists still get a row).
Returns:
    accuracy, macro_f1, and per-class lists precision, recall, f1, support indexed by label id.
"""


class Classification(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_INPUTS,
            features=datasets.Features({"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}),
        )

    def _compute(self, predictions, references, num_labels=None):
        predictions = np.asarray(predictions)
        references = np.asarray(references)
        labels = list(range(num_labels)) if num_labels else sorted(set(references) | set(predictions))
        precision, recall, f1, support = precision_recall_fscore_support(
            references, predictions, labels=labels, zero_division=0
        )
        return {
            "accuracy": float((predictions == references).mean()) if len(references) else 0.0,
            "macro_f1": float(np.mean(f1)) if len(f1) else 0.0,
            "precision": precision.tolist(),
            "recall": recall.tolist(),
            "f1": f1.tolist(),
            "support": support.tolist(),
        }
