"""What the ONNX stages share: what a graph holds, the check that a stage was handed an ONNX model, and the node
order graph rewrites need."""

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
    "MatMulIntegerToFloat",
    "DynamicQuantizeMatMul",
    "DynamicQuantizeLinear",
    "QuantizeLinear",
)


# The `If` of a token-packed graph (`toolkit.stages.packing`): packed branch for calls with padding, else the graph
# as it was.
PACKING_IF = "pack/if_padded"


# Graph rewrites hold the whole graph in one protobuf (probes, copies), which stops at 2 GB.
EXTERNAL_DATA = "the graph keeps its weights in external data files"


def external_data(model) -> bool:
    """Whether `model` (loaded without its external data) keeps weights in external data files."""
    import onnx

    return any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer)


def unpacked(graph):
    """The graph a call without padding runs: a packed graph's plain branch, any other graph itself."""
    for node in graph.node:
        if node.op_type == "If" and node.name == PACKING_IF:
            return next(a.g for a in node.attribute if a.name == "else_branch")
    return graph


def tensor_session(model, names: list[str]):
    """An ONNX Runtime session on a copy of `model` that also outputs the named intermediate tensors: no graph
    optimization, which would fuse some of them away. Outputs without a declared type: ONNX Runtime fills it in."""
    import onnx
    import onnxruntime as ort

    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    known = {o.name for o in probe.graph.output}
    probe.graph.output.extend(onnx.ValueInfoProto(name=n) for n in names if n not in known)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(probe.SerializeToString(), options, providers=["CPUExecutionProvider"])


def op_counts(path: Path) -> dict[str, int]:
    """Ops of the graph (of its plain branch when packed: the packed one adds only gathers around the same ops)."""
    import onnx

    graph = unpacked(onnx.load(str(path), load_external_data=False).graph)
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


def topological_sort(graph) -> None:
    """Nodes in an order where every input is produced before it is read: graph rewrites append their new nodes
    at the end."""
    ready = {i.name for i in graph.input} | {t.name for t in graph.initializer} | {""}
    pending, ordered = list(graph.node), []
    while pending:
        waiting = []
        for node in pending:
            if all(i in ready for i in node.input):
                ordered.append(node)
                ready.update(node.output)
            else:
                waiting.append(node)
        if len(waiting) == len(pending):
            raise ValueError(f"the graph has a cycle or an unproduced input at {waiting[0].name!r}")
        pending = waiting
    del graph.node[:]
    graph.node.extend(ordered)
