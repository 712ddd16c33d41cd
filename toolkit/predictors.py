"""Inference over an artifact, the same way for every format, so quality and speed are measured alike.

A predictor takes raw texts (tokenisation is part of what is timed: it is part of what a user waits for)
and returns logits as numpy. `PREDICTORS` maps an artifact format to its loader; ONNX stages add theirs.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import numpy as np

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".onnx", ".onnx_data", ".pt")


def resolve_threads(threads: int) -> int:
    return threads or os.cpu_count() or 1


def weights_size(path: Path) -> int:
    """Bytes of model weights on disk (tokenizer and config files excluded)."""
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file() and f.name.endswith(WEIGHT_SUFFIXES))


class Predictor:
    format = "?"

    def __init__(self, path: Path | str, max_length: int, threads: int):
        from transformers import AutoTokenizer

        self.path = path
        self.max_length = max_length
        self.threads = resolve_threads(threads)
        self.tokenizer = AutoTokenizer.from_pretrained(path)

    def encode(self, texts: list[str], tensors: str) -> dict:
        return self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_length, return_tensors=tensors)

    def logits(self, texts: list[str]) -> np.ndarray:
        raise NotImplementedError

    def logits_batched(self, texts: list[str], batch_size: int) -> np.ndarray:
        out = [self.logits(texts[i : i + batch_size]) for i in range(0, len(texts), batch_size)]
        return np.concatenate(out) if out else np.zeros((0, 0), dtype=np.float32)

    @property
    def num_parameters(self) -> int:
        raise NotImplementedError


class PyTorchPredictor(Predictor):
    format = "pytorch"

    def __init__(self, path: Path | str, max_length: int, threads: int, device: str = "cpu"):
        import torch
        from transformers import AutoModelForSequenceClassification

        super().__init__(path, max_length, threads)
        torch.set_num_threads(self.threads)
        self.device = device
        self.model = AutoModelForSequenceClassification.from_pretrained(path).to(device).eval()

    def logits(self, texts: list[str]) -> np.ndarray:
        import torch

        batch = self.encode(texts, "pt").to(self.device)
        with torch.inference_mode():
            return self.model(**batch).logits.float().cpu().numpy()

    @property
    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.model.parameters())


PREDICTORS: dict[str, Callable[..., Predictor]] = {"pytorch": PyTorchPredictor}


def load_predictor(path: Path | str, fmt: str, max_length: int, threads: int) -> Predictor:
    return PREDICTORS[fmt](path, max_length, threads)
