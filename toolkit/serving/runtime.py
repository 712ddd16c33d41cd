"""Inference for a packaged model: the tokenizer (truncation to the model's length, padding to the longest
text of the batch) and one ONNX Runtime session, or a PyTorch model when the selected candidate is PyTorch.
Built once per worker; `predict` is what the service's batched API calls."""

from __future__ import annotations

import inspect
import json
import os
from pathlib import Path

import numpy as np

from toolkit.serving.bundle import read_meta

# With several exports in one folder, the most compressed one is the one that was selected.
ONNX_PREFERENCE = ("model_quantized.onnx", "model_optimized.onnx", "model.onnx")


def cpu_threads() -> int:
    """Threads for one worker: TOOLKIT_THREADS, else the cores this process may use."""
    if os.environ.get("TOOLKIT_THREADS"):
        return max(1, int(os.environ["TOOLKIT_THREADS"]))
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS
        return os.cpu_count() or 1


def onnx_file(folder: Path) -> Path:
    for name in ONNX_PREFERENCE:
        if (folder / name).is_file():
            return folder / name
    found = sorted(folder.glob("*.onnx"))
    if not found:
        raise FileNotFoundError(f"no .onnx file in {folder}")
    return found[0]


def use_cuda() -> bool:
    return os.environ.get("TOOLKIT_DEVICE", "cpu").lower() == "cuda"


class Tokenizer:
    """A fast tokenizer from tokenizer.json (no transformers import); truncates and pads to the batch's longest."""

    def __init__(self, folder: Path, max_length: int):
        from tokenizers import Tokenizer as FastTokenizer

        self.tok = FastTokenizer.from_file(str(folder / "tokenizer.json"))
        config = json.loads((folder / "tokenizer_config.json").read_text())
        pad = config.get("pad_token") or "[PAD]"
        pad = pad["content"] if isinstance(pad, dict) else pad
        self.tok.enable_truncation(max_length)
        self.tok.enable_padding(pad_id=self.tok.token_to_id(pad) or 0, pad_token=pad)

    def __call__(self, texts: list[str]) -> dict[str, np.ndarray]:
        encodings = self.tok.encode_batch(texts)
        return {
            "input_ids": np.array([e.ids for e in encodings], dtype=np.int64),
            "attention_mask": np.array([e.attention_mask for e in encodings], dtype=np.int64),
            "token_type_ids": np.array([e.type_ids for e in encodings], dtype=np.int64),
        }


class OnnxModel:
    def __init__(self, folder: Path, threads: int):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        providers = ["CPUExecutionProvider"]
        if use_cuda() and "CUDAExecutionProvider" in ort.get_available_providers():
            providers.insert(0, "CUDAExecutionProvider")
        self.file = onnx_file(folder)
        self.session = ort.InferenceSession(str(self.file), options, providers=providers)
        self.inputs = [i.name for i in self.session.get_inputs()]

    def __call__(self, batch: dict[str, np.ndarray]) -> np.ndarray:
        return self.session.run(None, {k: batch[k] for k in self.inputs})[0]


class TorchModel:
    def __init__(self, folder: Path, threads: int):
        try:
            import torch
            from transformers import AutoModelForSequenceClassification
        except ImportError as exc:
            raise ImportError(
                f"{folder} holds a PyTorch model, which needs torch and transformers; the CPU bento ships only "
                "ONNX Runtime: build with `bentoml build -f bentofile-gpu.yaml` or select an ONNX stage"
            ) from exc

        torch.set_num_threads(threads)
        self.device = "cuda" if use_cuda() and torch.cuda.is_available() else "cpu"
        self.model = AutoModelForSequenceClassification.from_pretrained(folder).to(self.device).eval()
        # DistilBERT/RoBERTa-style models take no token_type_ids.
        self.inputs = set(inspect.signature(self.model.forward).parameters)

    def __call__(self, batch: dict[str, np.ndarray]) -> np.ndarray:
        import torch

        tensors = {k: torch.from_numpy(v).to(self.device) for k, v in batch.items() if k in self.inputs}
        with torch.inference_mode():
            return self.model(**tensors).logits.float().cpu().numpy()


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return shifted / shifted.sum(axis=-1, keepdims=True)


class Classifier:
    def __init__(self, folder: str | Path, threads: int | None = None):
        folder = Path(folder)
        self.meta = read_meta(folder)
        self.labels: list[str] = self.meta["labels"]
        self.tokenizer = Tokenizer(folder, int(self.meta["max_length"]))
        threads = threads or cpu_threads()
        self.model = OnnxModel(folder, threads) if self.meta["format"] == "onnx" else TorchModel(folder, threads)

    def predict(self, texts: list[str]) -> tuple[list[int], list[float]]:
        """Class ids and the probability of each predicted class."""
        if not texts:
            return [], []
        probs = softmax(self.model(self.tokenizer(texts)).astype(np.float64))
        ids = probs.argmax(axis=-1)
        return ids.tolist(), probs[np.arange(len(ids)), ids].tolist()
