"""What the ONNX stages share: what a graph holds, and the check that a stage was handed an ONNX model."""

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
