"""SmoothQuant (Xiao et al., 2023) on an ONNX graph, before INT8: activation channels with outliers are divided by a
per-channel factor and the weight rows they meet multiplied by it, so the product is unchanged in FP32 while the
activation's range, which INT8 shares across all its channels, narrows.

    s_j = max|x_j| ** alpha / max|w_j| ** (1 - alpha)

A fused Attention's output takes the factor through its value weights and bias; every other smoothed activation
gets a `Mul` by 1/s (a BERT layer's LayerNorm output also feeds the residual and GELU is not linear, so the factor
cannot be folded into the op before). Activation maxima come from the
calibration texts, padding excluded. Weights then need one scale per output channel (`per_channel`): the rows now
differ in range, which a single weight scale would lose.
"""

from __future__ import annotations

import time
from collections import defaultdict
from pathlib import Path

import numpy as np

from toolkit.stages.pooled import POOLED

SMOOTHED_OPS = ("MatMul", "Attention")  # Attention: the fused QKV projection of `optimize`'s O2 graph


def smoothable(graph) -> dict[str, list]:
    """Activation name -> the nodes that multiply it by a 2-D weight initializer (Q, K and V share one input in an
    unfused graph: one factor serves them all)."""
    weights = {t.name: t for t in graph.initializer if len(t.dims) == 2}
    groups: dict[str, list] = defaultdict(list)
    for node in graph.node:
        if node.op_type in SMOOTHED_OPS and len(node.input) > 1 and node.input[1] in weights:
            groups[node.input[0]].append(node)
    return dict(groups)


def activation_maxima(model, names: list[str], batches) -> dict[str, np.ndarray]:
    """Per-channel max |x| of each named tensor over the real (unpadded) tokens of `batches`."""
    from toolkit.stages.onnx_common import tensor_session

    session = tensor_session(model, names)
    wanted = [i.name for i in session.get_inputs()]
    maxima: dict[str, np.ndarray] = {}
    for batch in batches:
        feeds = {k: batch.get(k, np.zeros_like(batch["input_ids"])) for k in wanted}
        real = batch.get("attention_mask", np.ones_like(batch["input_ids"])).astype(bool)
        for name, value in zip(names, session.run(names, feeds), strict=True):
            tokens = (
                value[real] if value.ndim == 3 and value.shape[:2] == real.shape else value.reshape(-1, value.shape[-1])
            )
            peak = np.abs(tokens).max(axis=0)
            maxima[name] = np.maximum(maxima[name], peak) if name in maxima else peak
    return maxima


def smooth(path: Path, batches, alpha: float) -> dict:
    """Rewrite the ONNX file at `path` in place; returns what the manifest records."""
    import onnx
    from onnx import numpy_helper

    from toolkit.stages.onnx_common import topological_sort

    start = time.perf_counter()
    model = onnx.load(str(path))
    graph = model.graph
    groups = smoothable(graph)
    maxima = activation_maxima(model, sorted(groups), batches)
    weights = {t.name: t for t in graph.initializer}
    factors, folded = [], 0
    for name, nodes in groups.items():
        arrays = [numpy_helper.to_array(weights[n.input[1]]) for n in nodes]
        w_max = np.max([np.abs(a).max(axis=1) for a in arrays], axis=0)
        if w_max.shape != maxima[name].shape:  # a weight that does not meet the activation's channels
            continue
        s = (np.maximum(maxima[name], 1e-5) ** alpha / np.maximum(w_max, 1e-5) ** (1 - alpha)).astype(np.float32)
        for node, array in zip(nodes, arrays, strict=True):
            weights[node.input[1]].CopyFrom(numpy_helper.from_array(array * s[:, None], node.input[1]))
        factors.append(s)
        if fold_into_attention(graph, name, nodes, s, weights):
            folded += 1
            continue
        inverse = numpy_helper.from_array((1.0 / s).astype(np.float32), f"{name}/smooth_inverse")
        graph.initializer.append(inverse)
        smoothed = f"{name}/smoothed"
        graph.node.append(onnx.helper.make_node("Mul", [name, inverse.name], [smoothed], name=f"{name}/smooth"))
        for node in nodes:
            node.input[0] = smoothed
    topological_sort(graph)
    onnx.save(model, str(path))
    spread = [float(s.max() / s.min()) for s in factors]
    return {
        "alpha": alpha,
        "activations": len(factors),
        "nodes": sum(len(nodes) for nodes in groups.values()),
        "folded_into_attention": folded,
        "largest_factor_spread": round(max(spread, default=1.0), 1),
        "seconds": round(time.perf_counter() - start, 2),
    }


def fold_into_attention(graph, name: str, readers: list, s: np.ndarray, weights: dict) -> bool:
    """Divide a fused Attention's value columns (weights and bias) by `s` instead of adding a `Mul` after it, when
    its output is read only by the smoothed nodes (directly, or through the pooled token's row of it): attention's
    output is a weighted sum of value vectors, so scaling each value channel scales that output channel alike."""
    from onnx import numpy_helper

    def producer_of(tensor: str):
        return next((n for n in graph.node if tensor in n.output), None)

    def read_only_by(tensor: str, nodes: list) -> bool:
        return sum(tensor in n.input for n in graph.node) == len(nodes)

    producer = producer_of(name)
    if producer is not None and producer.op_type == "Gather" and producer.name.startswith(POOLED):
        # the pooled token's row of an attention output (`toolkit.stages.pooled`): a row keeps its channels
        if not read_only_by(name, readers):
            return False
        name, readers = producer.input[0], [producer]
        producer = producer_of(name)
    if producer is None or producer.op_type != "Attention" or producer.output[0] != name:
        return False
    if len(producer.input) < 3 or not {producer.input[1], producer.input[2]} <= weights.keys():
        return False
    if not read_only_by(name, readers):
        return False
    for index in (1, 2):  # value columns come last in the packed QKV weight and bias
        array = numpy_helper.to_array(weights[producer.input[index]]).copy()
        array[..., -len(s) :] /= s
        weights[producer.input[index]].CopyFrom(numpy_helper.from_array(array, producer.input[index]))
    return True
