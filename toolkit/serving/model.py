"""A packaged model as the service runs it: the bundle's `toolkit.json` (format, labels, max length) and the one
inference runtime that evaluation measured (`toolkit.runtime`). Built once per worker."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from toolkit.runtime import available_cores, cpu_model, load_model, softmax
from toolkit.serving.bundle import read_meta

ENV_OVERRIDES = {
    "threads": "TOOLKIT_THREADS",
    "lanes": "TOOLKIT_LANES",
    "spin": "TOOLKIT_ORT_SPIN",
    "fuse_skip_layer_norm": "TOOLKIT_ORT_FUSE_SLN",
}


def session_settings(meta: dict, workers: int = 1, env: dict | None = None) -> tuple[dict, str]:
    """The served session's threads, spinning and SkipLayerNorm fusion: an environment variable wins, then what
    the package stage measured when this is the CPU it measured on, else the defaults (all cores, spin, unfused).
    Workers share the cores. Returns the settings and where they came from."""
    env = os.environ if env is None else env
    tuned = meta.get("runtime") or {}
    # The measurement was of the CPU execution provider; a GPU session keeps the provider's defaults.
    on_cpu = env.get("TOOLKIT_DEVICE", "cpu").lower() == "cpu"
    same_cpu = on_cpu and tuned.get("cpu") == cpu_model() and tuned.get("cores") == available_cores()
    defaults = {"threads": None, "lanes": 1, "spin": True, "fuse_skip_layer_norm": None}
    settings = {**defaults, **tuned["choice"]} if same_cpu else defaults
    source = f"measured on this CPU on {tuned['date']}" if same_cpu else "defaults"
    if tuned and on_cpu and not same_cpu:
        source += f" (measured on {tuned.get('cpu')} x{tuned.get('cores')}, not this CPU: re-run `package` here)"
    for key, var in ENV_OVERRIDES.items():
        if env.get(var):
            settings[key] = int(env[var]) if key in ("threads", "lanes") else env[var] == "1"
            source += f", {var} from the environment"
    settings["threads"] = max(1, (settings["threads"] or available_cores()) // workers)
    return settings, source


class ServedModel:
    """The bundle's model in `lanes` copies that may run at the same time, `threads` intra-op threads in all (two
    single-threaded calls at once got more texts through 2 cores than one call on both; see docs/serving.md)."""

    def __init__(
        self, folder: str | Path, threads: int | None = None, device: str | None = None, lanes: int = 1, **options
    ):
        folder = Path(folder)
        self.meta = read_meta(folder)
        self.labels: list[str] = self.meta["labels"]
        fmt = self.meta["format"]
        options = options if fmt == "onnx" else {}
        per_lane = max(1, (threads or available_cores()) // lanes)
        max_length = int(self.meta["max_length"])
        self.lanes = [load_model(folder, fmt, max_length, per_lane, device, **options) for _ in range(lanes)]

    def logits(self, texts: list[str]) -> np.ndarray:
        return self.lanes[0].logits(texts)

    def predict(self, texts: list[str]) -> tuple[list[int], list[float]]:
        """Class ids and the probability of each predicted class."""
        return top_classes(self.logits(texts)) if texts else ([], [])


def top_classes(logits: np.ndarray) -> tuple[list[int], list[float]]:
    """Each row's most likely class id and its probability (softmax in float64)."""
    probs = softmax(np.asarray(logits, dtype=np.float64))
    ids = probs.argmax(axis=-1)
    return ids.tolist(), probs[np.arange(len(ids)), ids].tolist()
