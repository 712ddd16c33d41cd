"""Quality metrics of a classifier: accuracy, macro-F1 and per-class precision, recall, F1 and support, from
scikit-learn (offline; `evaluate.load("accuracy")` would fetch its script from the Hub)."""

from __future__ import annotations

from typing import Any

import numpy as np


def classification_metrics(predictions: np.ndarray, references: np.ndarray, label_names: list[str]) -> dict[str, Any]:
    """Every label gets a row, present in the split or not (zero where undefined)."""
    from sklearn.metrics import precision_recall_fscore_support

    predictions, references = np.asarray(predictions), np.asarray(references)
    precision, recall, f1, support = precision_recall_fscore_support(
        references, predictions, labels=list(range(len(label_names))), zero_division=0
    )
    per_class = {
        name: {
            "precision": float(precision[i]),
            "recall": float(recall[i]),
            "f1": float(f1[i]),
            "support": int(support[i]),
        }
        for i, name in enumerate(label_names)
    }
    return {
        "accuracy": float((predictions == references).mean()) if len(references) else 0.0,
        "macro_f1": float(np.mean(f1)) if len(f1) else 0.0,
        "per_class": per_class,
    }
