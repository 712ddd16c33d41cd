"""A model folder (PyTorch or ONNX) behind one interface: raw texts in, float32 logits out. Tokenisation is part
of every call, because it is part of what a user waits for: the figures in the report are the served path's.

The feeder gives a graph exactly the inputs it declares: what the tokenizer gave, and zeros for
`token_type_ids` when the tokenizer gives none (an XLM-R tokenizer on a BERT graph, as in multilingual-e5).
"""

from __future__ import annotations

import inspect
from pathlib import Path

import numpy as np

from toolkit.runtime.checkpoint import load_classifier
from toolkit.runtime.hardware import resolve_device, resolve_threads
from toolkit.runtime.onnx import onnx_file, ort_session
from toolkit.runtime.tokenizer import Tokenizer

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".onnx", ".onnx_data", ".pt")  # OpenVINO IR weights: .bin


def weights_size(path: Path | str) -> int:
    """Bytes of model weights on disk (tokenizer and config files excluded)."""
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file() and f.name.endswith(WEIGHT_SUFFIXES))


def feed(batch: dict[str, np.ndarray], wanted: list[str]) -> dict[str, np.ndarray]:
    """The inputs a model takes, from a tokenised batch: missing `token_type_ids` are zeros, extra ones dropped."""
    out = {}
    for name in wanted:
        if name in batch:
            out[name] = batch[name]
        elif name == "token_type_ids":
            out[name] = np.zeros_like(batch["input_ids"])
        else:
            raise ValueError(f"the model takes {name!r}, which its tokenizer does not give ({sorted(batch)})")
    return out


def length_groups(lengths: np.ndarray, call_cost: int = 256) -> list[np.ndarray]:
    """Indices of a batch grouped by token count so that the padded work plus a per-call cost is least: texts
    sorted by length, cut where a new call pays for itself (exact, by dynamic programming over the cuts).
    `call_cost` is a model call's fixed cost in padded tokens."""
    order = np.argsort(lengths, kind="stable")
    sorted_lengths = lengths[order].tolist()
    n = len(sorted_lengths)
    best, cut = [0] + [None] * n, [0] * (n + 1)
    for end in range(1, n + 1):
        width = sorted_lengths[end - 1]
        best[end], cut[end] = min((best[start] + (end - start) * width + call_cost, start) for start in range(end))
    groups, end = [], n
    while end > 0:
        groups.append(order[cut[end] : end])
        end = cut[end]
    return groups[::-1]


def bucketed(batch: dict[str, np.ndarray]) -> list[tuple[np.ndarray, dict[str, np.ndarray]]]:
    """A tokenised batch as the calls `logits` makes: (row indices, those rows cut to their longest text)."""
    lengths = batch["attention_mask"].sum(axis=1)
    return [
        (index, {k: v[index, : lengths[index].max()] for k, v in batch.items()}) for index in length_groups(lengths)
    ]


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return shifted / shifted.sum(axis=-1, keepdims=True)


class InferenceModel:
    """`logits(texts)` for one model folder; `device` and `threads` say where and how it runs."""

    format = "?"

    # Split a batch into calls of similar length (each padded to its own longest text) instead of padding
    # every text to the batch's longest.
    buckets = True

    def __init__(self, path: Path | str, max_length: int, threads: int | None, device: str | None):
        self.path = path
        self.max_length = max_length
        self.threads = resolve_threads(threads)
        self.tokenizer = Tokenizer(path, max_length)

    def logits(self, texts: list[str]) -> np.ndarray:
        batch = self.tokenizer(texts)
        if not self.buckets or len(texts) < 2:
            return self.run(batch)
        parts = [(index, self.run(call)) for index, call in bucketed(batch)]
        out = np.empty((len(texts), parts[0][1].shape[1]), dtype=np.float32)
        for index, logits in parts:
            out[index] = logits
        return out

    def run(self, batch: dict[str, np.ndarray]) -> np.ndarray:
        raise NotImplementedError

    def logits_batched(self, texts: list[str], batch_size: int) -> np.ndarray:
        out = [self.logits(texts[i : i + batch_size]) for i in range(0, len(texts), batch_size)]
        return np.concatenate(out) if out else np.zeros((0, 0), dtype=np.float32)

    def logits_by_length(self, texts: list[str], batch_size: int) -> np.ndarray:
        """Scoring many texts (a file): tokenised once, sorted by token count, cut into calls of `batch_size`
        texts of similar length, so a call pads little; rows come back in the input order. A call's composition
        differs from `logits_batched`'s: a graph with per-call INT8 scales (`activation_scales: per_call`) can
        answer otherwise in the last bits; per-token and static INT8, FP32 and FP16 cannot."""
        if not texts:
            return np.zeros((0, 0), dtype=np.float32)
        batch = self.tokenizer(texts)
        lengths = batch["attention_mask"].sum(axis=1)
        order = np.argsort(lengths, kind="stable")
        out = None
        for start in range(0, len(texts), batch_size):
            index = order[start : start + batch_size]
            logits = self.run({k: v[index, : lengths[index].max()] for k, v in batch.items()})
            out = np.empty((len(texts), logits.shape[1]), dtype=np.float32) if out is None else out
            out[index] = logits
        return out

    @property
    def num_parameters(self) -> int:
        raise NotImplementedError


class OnnxModel(InferenceModel):
    """ONNX Runtime on the folder's graph; on CUDA, inputs and outputs are bound to the device (IO binding)."""

    format = "onnx"

    def __init__(
        self,
        path: Path | str,
        max_length: int,
        threads: int | None = None,
        device: str | None = None,
        spin: bool | None = None,
        fuse_skip_layer_norm: bool | None = None,
    ):
        super().__init__(path, max_length, threads, device)
        self.file = onnx_file(path)
        cuda = resolve_device(device, "onnx") == "cuda"
        self.session = ort_session(self.file, self.threads, cuda, spin, fuse_skip_layer_norm)
        self.device = "cuda" if "CUDAExecutionProvider" in self.session.get_providers() else "cpu"
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_name = self.session.get_outputs()[0].name

    def run(self, batch: dict[str, np.ndarray]) -> np.ndarray:
        inputs = feed(batch, self.input_names)
        if self.device != "cuda":
            return self.session.run([self.output_name], inputs)[0].astype(np.float32)
        binding = self.session.io_binding()
        for name, array in inputs.items():
            binding.bind_cpu_input(name, array)
        binding.bind_output(self.output_name, "cuda")
        self.session.run_with_iobinding(binding)
        return binding.copy_outputs_to_cpu()[0].astype(np.float32)

    @property
    def num_parameters(self) -> int:
        import onnx

        graph = onnx.load(str(self.file), load_external_data=False).graph
        return int(sum(np.prod(t.dims, dtype=np.int64) for t in graph.initializer))


class TorchModel(InferenceModel):
    format = "pytorch"

    def __init__(
        self,
        path: Path | str,
        max_length: int,
        threads: int | None = None,
        device: str | None = None,
        compact_heads: bool = True,
    ):
        """`compact_heads=False` runs a head-pruned folder as stock transformers loads it (its pruned heads as
        zeros) instead of sliced away."""
        try:
            import torch
            import transformers  # noqa: F401
        except ImportError as exc:
            raise ImportError(
                f"{path} holds a PyTorch model, which needs torch and transformers; the CPU bento ships only "
                "ONNX Runtime: build with `bentoml build -f bentofile-gpu.yaml` or select an ONNX stage"
            ) from exc

        super().__init__(path, max_length, threads, device)
        torch.set_num_threads(self.threads)
        self.device = resolve_device(device, "torch")
        self.model = load_classifier(path, compact_heads).to(self.device).eval()
        # DistilBERT/RoBERTa-style models take no token_type_ids.
        accepted = inspect.signature(self.model.forward).parameters
        self.input_names = [n for n in ("input_ids", "attention_mask", "token_type_ids") if n in accepted]

    def run(self, batch: dict[str, np.ndarray]) -> np.ndarray:
        import torch

        # Only what the tokenizer gave: the model's own default for a missing input is the right one.
        tensors = {k: torch.from_numpy(v).to(self.device) for k, v in batch.items() if k in self.input_names}
        with torch.inference_mode():
            return self.model(**tensors).logits.float().cpu().numpy()

    @property
    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.model.parameters())


class OpenVinoModel(InferenceModel):
    """OpenVINO's CPU plugin on the folder's IR (`openvino_model.xml`), compiled once; one infer request."""

    format = "openvino"

    def __init__(self, path: Path | str, max_length: int, threads: int | None = None, device: str | None = None):
        from toolkit.runtime.openvino import compiled_model, ir_file

        super().__init__(path, max_length, threads, device)
        self.device = "cpu"
        self.file = ir_file(path)
        self.compiled = compiled_model(self.file, self.threads)
        self.input_names = [port.get_any_name() for port in self.compiled.inputs]
        self.output = self.compiled.outputs[0]
        self.request = self.compiled.create_infer_request()

    def run(self, batch: dict[str, np.ndarray]) -> np.ndarray:
        # Shared: no copy of the inputs into the request, nor of the output out of it (astype copies it).
        outputs = self.request.infer(feed(batch, self.input_names), share_inputs=True, share_outputs=True)
        return outputs[self.output].astype(np.float32)

    @property
    def num_parameters(self) -> int:
        from toolkit.runtime.openvino import import_openvino

        model = import_openvino().Core().read_model(str(self.file))
        constants = [op for op in model.get_ordered_ops() if op.get_type_name() == "Constant"]
        return int(sum(np.prod(op.get_output_shape(0), dtype=np.int64) for op in constants))


MODELS: dict[str, type[InferenceModel]] = {"pytorch": TorchModel, "onnx": OnnxModel, "openvino": OpenVinoModel}


def load_model(
    path: Path | str,
    fmt: str,
    max_length: int,
    threads: int | None = None,
    device: str | None = None,
    **options,
) -> InferenceModel:
    """The model of a folder. `threads`: 0/None for TOOLKIT_THREADS or the cores this process may use; `device`: a recipe's device
    (auto, cpu, cuda) or None for TOOLKIT_DEVICE; `options` for the format's class (ONNX: `spin`, `fuse_skip_layer_norm`)."""
    if fmt not in MODELS:
        raise ValueError(f"unknown model format {fmt!r}; known: {', '.join(MODELS)}")
    return MODELS[fmt](path, max_length, threads, device, **options)
