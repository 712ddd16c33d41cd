"""OpenVINO: the IR file of a folder and the one way it is compiled (evaluation, benchmarks and the service all run
this compiled model). Optional: the `openvino` extra; nothing here is imported unless a model is OpenVINO's."""

from __future__ import annotations

from pathlib import Path

IR_NAME = "openvino_model.xml"  # optimum-intel's name, so its loaders find the graph too


def ir_file(folder: Path | str) -> Path:
    """The IR graph of a model folder (its `.bin` weights beside it)."""
    path = Path(folder) / IR_NAME
    if not path.is_file():
        raise FileNotFoundError(f"no {IR_NAME} in {folder}")
    return path


def import_openvino():
    try:
        import openvino
    except ImportError as exc:
        raise ImportError(
            "this model is OpenVINO IR, which needs the `openvino` extra: pip install -e '.[openvino]' (or "
            "`pip install openvino`), or build the bento with `bentoml build -f bentofile-openvino.yaml`"
        ) from exc
    return openvino


def compiled_model(file: Path, threads: int):
    """The IR compiled for the CPU with `threads` inference threads, one stream, tuned for latency, inference
    precision f32: it keeps the FP32 answers (OpenVINO would otherwise run an FP32 graph in bf16 on CPUs with AMX
    or AVX512-BF16); an INT8 IR runs its INT8 kernels either way."""
    ov = import_openvino()
    config = {
        "INFERENCE_NUM_THREADS": threads,
        "NUM_STREAMS": 1,
        "PERFORMANCE_HINT": "LATENCY",
        "INFERENCE_PRECISION_HINT": "f32",
    }
    return ov.Core().compile_model(str(file), "CPU", config)
