"""The one inference runtime, from evaluation to the bento: tokenizer, session, input feeder, device and threads.

It imports nothing from the rest of toolkit, and nothing heavy at import: the service loads ONNX Runtime (or
torch, for a PyTorch model) only when a model is built.
"""

from toolkit.runtime.hardware import available_cores, cpu_model, resolve_device, resolve_threads
from toolkit.runtime.model import InferenceModel, feed, load_model, softmax, weights_size
from toolkit.runtime.onnx import onnx_file, ort_session
from toolkit.runtime.tokenizer import Tokenizer

__all__ = [
    "InferenceModel",
    "Tokenizer",
    "available_cores",
    "cpu_model",
    "feed",
    "load_model",
    "onnx_file",
    "ort_session",
    "resolve_device",
    "resolve_threads",
    "softmax",
    "weights_size",
]
