"""One answer, everywhere, to "how many threads" and "which device": evaluation, benchmarks, training and the
service all ask here."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

Backend = Literal["torch", "onnx"]


def available_cores() -> int:
    """The cores this process may use (its CPU affinity: a container's or taskset's limit, not the host's)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS
        return os.cpu_count() or 1


def cpu_model() -> str:
    """The CPU's model name as `lscpu` shows it (figures are only comparable on the same one)."""
    import platform

    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def resolve_threads(requested: int | None = None) -> int:
    """Intra-op threads: `requested` when > 0, else TOOLKIT_THREADS, else every core this process may use."""
    if requested:
        return requested
    if os.environ.get("TOOLKIT_THREADS"):
        return max(1, int(os.environ["TOOLKIT_THREADS"]))
    return available_cores()


def resolve_device(requested: str | None = None, backend: Backend = "torch") -> Literal["cpu", "cuda"]:
    """`cpu`, or `cuda` where the backend can use a GPU. `requested` is a recipe's device (auto, cpu, cuda);
    None reads TOOLKIT_DEVICE (the service's setting, default cpu). Never fails for want of a GPU: `auto` and
    `cuda` fall back to the CPU, and the result says which one runs."""
    if requested is None:
        requested = os.environ.get("TOOLKIT_DEVICE", "cpu").lower()
    if requested == "cpu":
        return "cpu"
    return "cuda" if cuda_available(backend) else "cpu"


def cuda_available(backend: Backend) -> bool:
    if backend == "onnx":
        import onnxruntime

        return "CUDAExecutionProvider" in onnxruntime.get_available_providers()
    try:
        import torch
    except ImportError:  # the CPU bento ships no torch
        return False
    return torch.cuda.is_available()
