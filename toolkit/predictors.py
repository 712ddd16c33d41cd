"""Inference over an artifact, the same way for every format, so quality and speed are measured alike.

A predictor takes raw texts (tokenisation is part of what is timed: it is part of what a user waits for)
and returns logits as numpy. `PREDICTORS` maps an artifact format to its loader; ONNX stages add theirs.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".onnx", ".onnx_data", ".pt")


def resolve_threads(threads: int) -> int:
    """The recipe's thread count; 0 means every core this process may use."""
    from toolkit.serving.runtime import available_cores

    return threads or available_cores()


def resolve_device(device: str) -> str:
    """`auto` and `cuda` mean CUDA only where torch sees a GPU; evaluation never fails for want of one."""
    if device == "cpu":
        return "cpu"
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def weights_size(path: Path) -> int:
    """Bytes of model weights on disk (tokenizer and config files excluded)."""
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file() and f.name.endswith(WEIGHT_SUFFIXES))


class Predictor:
    format = "?"

    def __init__(self, path: Path | str, max_length: int, threads: int, device: str = "cpu"):
        from transformers import AutoTokenizer

        self.path = path
        self.max_length = max_length
        self.threads = resolve_threads(threads)
        self.device = resolve_device(device)
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

        super().__init__(path, max_length, threads, device)
        torch.set_num_threads(self.threads)
        self.model = AutoModelForSequenceClassification.from_pretrained(path).to(self.device).eval()

    def logits(self, texts: list[str]) -> np.ndarray:
        import torch

        batch = self.encode(texts, "pt").to(self.device)
        with torch.inference_mode():
            return self.model(**batch).logits.float().cpu().numpy()

    @property
    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.model.parameters())


class OnnxPredictor(Predictor):
    """ONNX Runtime on the folder's one graph, in the session the service runs (`serving.runtime.ort_session`).
    On CUDA, inputs and outputs are bound to the device (IO binding)."""

    format = "onnx"

    def __init__(self, path: Path | str, max_length: int, threads: int, device: str = "cpu"):
        from toolkit.serving.runtime import ort_session
        from toolkit.stages.onnx_common import onnx_file

        super().__init__(path, max_length, threads, device)
        self.file = onnx_file(path)
        self.session = ort_session(self.file, self.threads, cuda=self.device == "cuda")
        self.device = "cuda" if "CUDAExecutionProvider" in self.session.get_providers() else "cpu"
        self.input_names = [i.name for i in self.session.get_inputs()]

    def _feed(self, texts: list[str]) -> dict[str, np.ndarray]:
        batch = self.encode(texts, "np")
        return {name: batch[name].astype(np.int64) for name in self.input_names}

    def logits(self, texts: list[str]) -> np.ndarray:
        feed = self._feed(texts)
        if self.device != "cuda":
            return self.session.run(["logits"], feed)[0].astype(np.float32)
        binding = self.session.io_binding()
        for name, array in feed.items():
            binding.bind_cpu_input(name, array)
        binding.bind_output("logits", "cuda")
        self.session.run_with_iobinding(binding)
        return binding.copy_outputs_to_cpu()[0].astype(np.float32)

    @property
    def num_parameters(self) -> int:
        import onnx

        graph = onnx.load(str(self.file), load_external_data=False).graph
        return int(sum(np.prod(t.dims, dtype=np.int64) for t in graph.initializer))


PREDICTORS: dict[str, Callable[..., Predictor]] = {"pytorch": PyTorchPredictor, "onnx": OnnxPredictor}


def load_predictor(path: Path | str, fmt: str, max_length: int, threads: int, device: str = "cpu") -> Predictor:
    return PREDICTORS[fmt](path, max_length, threads, device)
