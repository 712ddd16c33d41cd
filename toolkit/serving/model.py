"""A packaged model as the service runs it: the bundle's `toolkit.json` (format, labels, max length) and the one
inference runtime that evaluation measured (`toolkit.runtime`). Built once per worker."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from toolkit.runtime import load_model, softmax
from toolkit.serving.bundle import read_meta


class ServedModel:
    def __init__(self, folder: str | Path, threads: int | None = None, device: str | None = None, **options):
        folder = Path(folder)
        self.meta = read_meta(folder)
        self.labels: list[str] = self.meta["labels"]
        fmt = self.meta["format"]
        options = options if fmt == "onnx" else {}
        self.model = load_model(folder, fmt, int(self.meta["max_length"]), threads, device, **options)

    def logits(self, texts: list[str]) -> np.ndarray:
        return self.model.logits(texts)

    def predict(self, texts: list[str]) -> tuple[list[int], list[float]]:
        """Class ids and the probability of each predicted class."""
        return top_classes(self.logits(texts)) if texts else ([], [])


def top_classes(logits: np.ndarray) -> tuple[list[int], list[float]]:
    """Each row's most likely class id and its probability (softmax in float64)."""
    probs = softmax(np.asarray(logits, dtype=np.float64))
    ids = probs.argmax(axis=-1)
    return ids.tolist(), probs[np.arange(len(ids)), ids].tolist()
