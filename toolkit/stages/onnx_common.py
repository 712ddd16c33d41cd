"""What the ONNX stages share: where the graph lives in a folder, and what the graph holds."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from toolkit.stages.base import Artifact, StageContext

# Contrib ops that ONNX Runtime's transformer optimizer and quantizer write; counting them shows which fusions
# happened (LayerNormalization is a standard op from opset 17, fused from its primitive ops).
FUSED_OPS = (
    "Attention",
    "MultiHeadAttention",
    "QAttention",
    "EmbedLayerNormalization",
    "SkipLayerNormalization",
    "LayerNormalization",
    "SkipSimplifiedLayerNormalization",
    "SimplifiedLayerNormalization",
    "FastGelu",
    "BiasGelu",
    "Gelu",
    "QuickGelu",
    "GemmFastGelu",
    "BiasAdd",
    "FusedMatMul",
    "MatMulInteger",
    "DynamicQuantizeLinear",
)


def onnx_file(folder: Path | str) -> Path:
    """The one ONNX graph of a stage folder (each ONNX stage writes `model.onnx`)."""
    files = sorted(Path(folder).glob("*.onnx"))
    if len(files) != 1:
        raise FileNotFoundError(f"expected exactly one .onnx file in {folder}, found {[f.name for f in files]}")
    return files[0]


def op_counts(path: Path) -> dict[str, int]:
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    return dict(Counter(node.op_type for node in graph.node).most_common())


def fused_counts(counts: dict[str, int]) -> dict[str, int]:
    return {op: counts[op] for op in FUSED_OPS if op in counts}


def onnx_source(ctx: StageContext, stage_type: str) -> Artifact:
    if ctx.source.format != "onnx":
        raise ValueError(
            f"`{stage_type}` works on an ONNX model, but its input {ctx.source.stage!r} is {ctx.source.format}; "
            "put an `export` stage before it"
        )
    return ctx.source


def cuda_provider_available() -> bool:
    import onnxruntime

    return "CUDAExecutionProvider" in onnxruntime.get_available_providers()


def int8_from_pytorch(pytorch: Path, work: Path, fuse: bool = True) -> Path:
    """The export -> optimize (O2, when `fuse`) -> quantize stages with their default options, outside a run:
    benchmarks use it to make the INT8 model a recipe would make. Returns the INT8 folder (`work/quantize`)."""
    from types import SimpleNamespace

    from toolkit.stages import export, optimize, quantize

    recipe = SimpleNamespace(device="cpu")  # the ONNX stages read only the recipe's device
    chain = [("export", export.run, export.ExportConfig(type="export"))]
    if fuse:
        chain.append(("optimize", optimize.run, optimize.OptimizeConfig(type="optimize")))
    chain.append(("quantize", quantize.run, quantize.QuantizeConfig(type="quantize")))
    artifacts: dict[str, Artifact] = {"pytorch": Artifact(Path(pytorch), "pytorch", "pytorch")}
    source = artifacts["pytorch"]
    for name, run, cfg in chain:
        out = work / name
        out.mkdir(parents=True, exist_ok=True)
        source = run(cfg, StageContext(recipe, work, out, None, source, dict(artifacts))).artifact  # type: ignore[arg-type]
        artifacts[name] = source
    return source.path
