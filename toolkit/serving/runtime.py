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


def available_cores() -> int:
    """The cores this process may use (its CPU affinity: a container's or taskset's limit, not the host's)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS
        return os.cpu_count() or 1


def cpu_threads() -> int:
    """Threads for one worker: TOOLKIT_THREADS, else the cores this process may use."""
    if os.environ.get("TOOLKIT_THREADS"):
        return max(1, int(os.environ["TOOLKIT_THREADS"]))
    return available_cores()


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


# ONNX Runtime 1.32's CPU SkipLayerNormalization kernel is about 6x slower than the Add + LayerNormalization it
# replaces (measured at batch 32, sequence 54, hidden 384: 1.49 ms vs 0.24 ms on 2 threads), which cost an INT8
# student a quarter of its batch-32 throughput. So on the CPU the session does not fuse them (the optimize
# stage leaves them unfused for the CPU too); on CUDA the fused kernel is the fast one.
CPU_DISABLED_OPTIMIZERS = ("SkipLayerNormFusion",)


def ort_session(file: Path, threads: int, cuda: bool = False):
    """One ONNX Runtime session as evaluation and serving both run it: `threads` within an op, one between ops
    (a classifier's graph is a single chain), every graph optimization but the ones slower on this provider."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    cuda = cuda and "CUDAExecutionProvider" in ort.get_available_providers()
    providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if cuda else ["CPUExecutionProvider"]
    disabled = [] if cuda else list(CPU_DISABLED_OPTIMIZERS)
    return ort.InferenceSession(str(file), options, providers=providers, disabled_optimizers=disabled)


class OnnxModel:
    def __init__(self, folder: Path, threads: int):
        self.file = onnx_file(folder)
        self.session = ort_session(self.file, threads, cuda=use_cuda())
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
