"""Quality metrics through `evaluate`, loaded from the module kept in this package (works offline)."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

METRIC_DIR = Path(__file__).parent / "classification"


@lru_cache(maxsize=1)
def _metric():
    import evaluate

    return evaluate.load(str(METRIC_DIR))


def classification_metrics(predictions: np.ndarray, references: np.ndarray, label_names: list[str]) -> dict[str, Any]:
    scores = _metric().compute(
        predictions=np.asarray(predictions).tolist(),
        references=np.asarray(references).tolist(),
        num_labels=len(label_names),
    )
    per_class = {
        name: {
            "precision": scores["precision"][i],
            "recall": scores["recall"][i],
            "f1": scores["f1"][i],
            "support": int(scores["support"][i]),
        }
        for i, name in enumerate(label_names)
    }
    return {"accuracy": scores["accuracy"], "macro_f1": scores["macro_f1"], "per_class": per_class}
