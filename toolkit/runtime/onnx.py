"""ONNX Runtime: which graph of a folder runs, and the one way a session is made (evaluation, benchmarks and
the service all run this session)."""

from __future__ import annotations

from pathlib import Path

# With several graphs in one folder, the most compressed one is the one that was made last.
ONNX_PREFERENCE = ("model_quantized.onnx", "model_optimized.onnx", "model.onnx")

# ONNX Runtime 1.32's CPU SkipLayerNormalization kernel is about 6x slower than the Add + LayerNormalization it
# replaces (measured at batch 32, sequence 54, hidden 384: 1.49 ms vs 0.24 ms on 2 threads, AMD Zen 5), which
# cost an INT8 student a quarter of its batch-32 throughput. So on the CPU the session does not fuse them (the
# optimize stage leaves them unfused for the CPU too); on CUDA the fused kernel is the fast one.
CPU_DISABLED_OPTIMIZERS = ("SkipLayerNormFusion",)


def onnx_file(folder: Path | str) -> Path:
    """The graph of a model folder: its one `.onnx` file, or with several the first of `ONNX_PREFERENCE`."""
    folder = Path(folder)
    files = sorted(folder.glob("*.onnx"))
    if len(files) == 1:
        return files[0]
    for name in ONNX_PREFERENCE:
        if (folder / name).is_file():
            return folder / name
    if not files:
        raise FileNotFoundError(f"no .onnx file in {folder}")
    raise FileNotFoundError(
        f"{folder} holds several graphs ({[f.name for f in files]}) and none of {list(ONNX_PREFERENCE)}"
    )


def ort_session(
    file: Path,
    threads: int,
    cuda: bool = False,
    spin: bool | None = None,
    fuse_skip_layer_norm: bool | None = None,
    save_optimized: Path | None = None,
):
    """`threads` within an op, one between ops (a classifier's graph is a single chain), every graph
    optimization but the ones slower on this provider. CUDA only where ONNX Runtime has its provider.
    `spin`: whether idle intra-op threads spin for work (ONNX Runtime's default, None, is to spin); a server
    whose event loop shares the cores can lose more to spinning than it gains. `fuse_skip_layer_norm`: None for
    the provider's default (fused on CUDA, not on the CPU); the package stage measures both on the machine.
    `save_optimized`: write the graph the session runs after its own optimizations (to see what it fused)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    if spin is not None:
        options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if save_optimized is not None:
        options.optimized_model_filepath = str(save_optimized)
    cuda = cuda and "CUDAExecutionProvider" in ort.get_available_providers()
    providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if cuda else ["CPUExecutionProvider"]
    fuse = cuda if fuse_skip_layer_norm is None else fuse_skip_layer_norm
    disabled = [] if fuse else list(CPU_DISABLED_OPTIMIZERS)
    return ort.InferenceSession(str(file), options, providers=providers, disabled_optimizers=disabled)
