"""Per-token activation scales: a dynamically quantized graph whose answers do not depend on the other texts in
its model call.

ONNX Runtime's dynamic INT8 (`DynamicQuantizeLinear`) takes one activation scale and zero point per tensor, that is
per model call: a text's INT8 input to every matrix product depends on the largest value of any token of any text
it shares the call with. The service merges unrelated clients' requests into one call, so one client's text could
change another's class (7 of 2,040 texts of the full recipe's INT8 changed class between alone and calls of 32; AMD
EPYC, 2026-12-07).

The rewrite gives every token its own scale, from standard ops: `max |x|` over the token's features (`Abs`,
`ReduceMax` on the last axis), symmetric INT8 around a zero point of 128 (uint8, the operand ONNX Runtime's VNNI
kernels take), quantized by blocked `QuantizeLinear` (opset 21, one block per token). `MatMulInteger` keeps its
scalar zero point; the token's scale multiplies its row of the product after the weight's per-channel scales. A
fused `QAttention` (whose input scale must be one number) becomes `MatMulInteger` for the Q, K and V projections and
ONNX Runtime's `MultiHeadAttention` for the attention itself. Per-token scales are also finer than per-call ones: a
token with an outlier no longer coarsens every other token's INT8 values.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from toolkit.stages.packing import constants_of, readers_of

PREFIX = "token_scale/"  # of every tensor and node the rewrite adds; a graph that has them was rewritten already
OPSET = 21  # blocked QuantizeLinear
ZERO_POINT = 128


class NotApplicable(Exception):
    """A quantized product the rewrite does not know how to carry; the graph is left as it was."""


class Builder:
    """The nodes the rewrite adds, and the per-token zero points it shares between tensors of one row shape."""

    def __init__(self, graph, shapes: dict[str, tuple]):
        from onnx import helper, numpy_helper

        self.graph, self.helper, self.shapes, self.nodes = graph, helper, shapes, []
        self.zero_points: dict[tuple, str] = {}
        for name, value in (
            ("last_axis", np.array([-1], dtype=np.int64)),
            ("inverse_127", np.array(1 / 127, dtype=np.float32)),
            ("zero", np.array(0.0, dtype=np.float32)),
            ("zero_point_float", np.array(float(ZERO_POINT), dtype=np.float32)),
            ("zero_point", np.array(ZERO_POINT, dtype=np.uint8)),
            ("one", np.array(1.0, dtype=np.float32)),
        ):
            graph.initializer.append(numpy_helper.from_array(value, PREFIX + name))

    def add(self, op: str, inputs: list[str], output: str, domain: str | None = None, **attrs) -> str:
        self.nodes.append(self.helper.make_node(op, inputs, [output], name=output, domain=domain, **attrs))
        return output

    def quantize(self, x: str, width: int) -> tuple[str, str]:
        """(uint8 tokens, per-token scale `[..., 1]`) of the float tensor `x` whose last axis has `width` features.
        A row of zeros gets scale 0 and any INT8 values: its product is multiplied by 0."""
        p = PREFIX + x
        peak = self.add("ReduceMax", [self.add("Abs", [x], f"{p}/abs"), PREFIX + "last_axis"], f"{p}/peak", keepdims=1)
        scale = self.add("Mul", [peak, PREFIX + "inverse_127"], f"{p}/scale")
        zero_point = self.zero_point(x, scale)
        quantized = self.add("QuantizeLinear", [x, scale, zero_point], f"{p}/quantized", axis=-1, block_size=width)
        return quantized, scale

    def zero_point(self, x: str, scale: str) -> str:
        """Blocked QuantizeLinear wants a zero point shaped like its scale: 128 in every token's slot, made once
        per row shape (the tokens of a call, the pooled rows) from the first scale of that shape."""
        rows = tuple(self.shapes[x][:-1])
        if rows not in self.zero_points:
            p = f"{PREFIX}zero_point_{'x'.join(map(str, rows))}"
            zeros = self.add("Mul", [scale, PREFIX + "zero"], f"{p}/zeros")
            shifted = self.add("Add", [zeros, PREFIX + "zero_point_float"], f"{p}/float")
            self.zero_points[rows] = self.add("Cast", [shifted], p, to=2)  # uint8
        return self.zero_points[rows]

    def product(self, quantized: str, weight: str, weight_scale: str, weight_zero: str, scale: str, out: str) -> str:
        """`out` = the token's INT8 row times the INT8 weight, scaled by the weight's scales, then the token's."""
        inputs = [quantized, weight, PREFIX + "one", weight_scale, PREFIX + "zero_point", weight_zero]
        product = self.add("MatMulIntegerToFloat", inputs, f"{PREFIX}{out}/weight_scaled", domain="com.microsoft")
        return self.add("Mul", [product, scale], out)


def rewrite_matmul(node, quantized: str, scale: str, b: Builder, readers, producers) -> None:
    """MatMulInteger -> Cast -> Mul(call scale x weight scales) becomes one product on the token's INT8 row."""
    cast = only_reader(node.output[0], "Cast", readers)
    rescale = only_reader(cast.output[0], "Mul", readers)
    scales = producers.get(rescale.input[1])
    dql = producers.get(node.input[0])
    if scales is None or scales.op_type != "Mul" or scales.input[0] != dql.output[1]:
        raise NotApplicable(f"{node.name!r}: its product is not rescaled by call scale x weight scale")
    weight_zero = node.input[3] if len(node.input) > 3 else ""
    b.product(quantized, node.input[1], scales.input[1], weight_zero, scale, rescale.output[0])
    b.graph.node.remove(rescale)  # its output is the product's now; the rest is unread and dropped


def rewrite_attention(node, quantized: str, scale: str, b: Builder) -> None:
    """QAttention -> one product for Q, K and V -> Split -> MultiHeadAttention with the bias and the mask QAttention
    had."""
    from onnx import helper

    inputs = list(node.input) + [""] * (9 - len(node.input))
    _, weight, bias, _, weight_scale, mask, _, weight_zero, past = inputs
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    if past or attrs.get("unidirectional", 0) or set(attrs) - {"num_heads", "unidirectional", "mask_filter_value"}:
        raise NotApplicable(f"QAttention {node.name!r} has options MultiHeadAttention does not take: {sorted(attrs)}")
    p = PREFIX + node.name
    # Q, K and V as three products of the same INT8 tokens (a Split of one product would copy it once more).
    parts = []
    for k, name in enumerate("qkv"):
        columns = slice_columns(b, weight, weight_scale, weight_zero, k)
        parts.append(b.product(quantized, *columns, scale, f"{p}/{name}"))
    extra = {k: v for k, v in attrs.items() if k == "mask_filter_value"}
    b.nodes.append(
        helper.make_node(
            "MultiHeadAttention", [*parts, bias, mask], list(node.output), name=f"{p}/attention",
            domain="com.microsoft", num_heads=attrs["num_heads"], **extra,
        )
    )  # fmt: skip
    b.graph.node.remove(node)


def slice_columns(b: Builder, weight: str, weight_scale: str, weight_zero: str, k: int) -> tuple[str, str, str]:
    """The k-th third of QAttention's packed Q|K|V weight, its scales and zero points, as new initializers."""
    from onnx import numpy_helper

    constants = {t.name: t for t in b.graph.initializer}
    out = []
    for name in (weight, weight_scale, weight_zero):
        array = numpy_helper.to_array(constants[name])
        if array.ndim and array.shape[-1] % 3 == 0 and array.size > 1:
            third = array.shape[-1] // 3
            array = array[..., k * third : (k + 1) * third]
        out.append(f"{PREFIX}{name}/{'qkv'[k]}")
        b.graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(array), out[-1]))
    return tuple(out)


def only_reader(name: str, op: str, readers) -> object:
    taken = readers.get(name, [])
    if len(taken) != 1 or taken[0].op_type != op:
        raise NotApplicable(f"{name} is read by {[n.op_type for n in taken]}, not by one {op}")
    return taken[0]


def activation_product(node, graph, readers, producers) -> None:
    """MatMulInteger of two activations (an unfused attention's Q x K or weights x V): a per-token scale of the
    second operand would be a per-column one, which no INT8 kernel here takes. Left in float instead (a few
    percent of an unfused layer's work at classification lengths); its quantizers are dropped when unread."""
    from onnx import helper

    cast = only_reader(node.output[0], "Cast", readers)
    rescale = only_reader(cast.output[0], "Mul", readers)
    sources = [producers.get(name) for name in node.input[:2]]
    if any(p is None or p.op_type != "DynamicQuantizeLinear" for p in sources):
        raise NotApplicable(f"MatMulInteger {node.name!r} does not read two dynamically quantized tensors")
    graph.node.append(helper.make_node("MatMul", [p.input[0] for p in sources], [rescale.output[0]],
                                       name=f"{PREFIX}{node.name}/float"))  # fmt: skip
    graph.node.remove(rescale)


def width_of(node, constants) -> int:
    weight = constants.get(node.input[1])
    if weight is None or weight.ndim != 2:
        raise NotApplicable(f"{node.op_type} {node.name!r} has no 2-D constant weight")
    return int(weight.shape[0])


def rewrite(graph, shapes: dict[str, tuple]) -> dict:
    from toolkit.stages.onnx_common import topological_sort

    constants, readers = constants_of(graph), readers_of(graph)
    producers = {o: n for n in graph.node for o in n.output}
    counts = {"tokens_scaled": 0, "products": 0, "attentions": 0, "left_in_float": 0}
    for node in [n for n in graph.node if n.op_type == "MatMulInteger" and n.input[1] not in constants]:
        activation_product(node, graph, readers, producers)
        counts["left_in_float"] += 1
    drop_unread(graph)
    readers, producers = readers_of(graph), {o: n for n in graph.node for o in n.output}
    b = Builder(graph, shapes)
    for dql in [n for n in graph.node if n.op_type == "DynamicQuantizeLinear"]:
        users = readers.get(dql.output[0], [])
        if not users or any(u.op_type not in ("MatMulInteger", "QAttention") for u in users):
            raise NotApplicable(f"{dql.output[0]} is read by {sorted({u.op_type for u in users})}")
        widths = {width_of(u, constants) for u in users}
        if len(widths) != 1:
            raise NotApplicable(f"{dql.output[0]} feeds products of widths {sorted(widths)}")
        quantized, scale = b.quantize(dql.input[0], widths.pop())
        for user in users:
            if user.op_type == "MatMulInteger":
                rewrite_matmul(user, quantized, scale, b, readers, producers)
                counts["products"] += 1
            else:
                rewrite_attention(user, quantized, scale, b)
                counts["attentions"] += 1
        counts["tokens_scaled"] += 1
    if not counts["tokens_scaled"]:
        raise NotApplicable("no DynamicQuantizeLinear: the graph has no per-call activation scales")
    graph.node.extend(b.nodes)
    drop_unread(graph)
    topological_sort(graph)
    # The shapes of every tensor the graph had are unchanged: kept, ONNX Runtime's SkipLayerNorm fusion reads them.
    return counts


def drop_unread(graph) -> None:
    """Nodes none of whose outputs is read (the per-call quantizers and scale products the rewrite replaced)."""
    outputs = {o.name for o in graph.output}
    while True:
        read = {i for n in graph.node for i in n.input} | outputs
        dead = [n for n in graph.node if not any(o in read for o in n.output if o)]
        for node in dead:
            graph.node.remove(node)
        if not dead:
            break
    read = {i for n in graph.node for i in n.input}
    for tensor in [t for t in graph.initializer if t.name not in read]:
        graph.initializer.remove(tensor)


def set_opset(model, version: int) -> None:
    for entry in model.opset_import:
        if entry.domain in ("", "ai.onnx") and entry.version < version:
            entry.version = version


def per_token_scales(path: Path, atol: float = 1e-4) -> dict:
    """Rewrite the dynamically quantized ONNX file at `path` in place; returns what the manifest records. The
    rewritten graph must answer a batch of probe texts exactly as it answers each text alone (to `atol`)."""
    import onnx

    from toolkit.stages.packing import NotPackable, ort_errors

    start = time.perf_counter()
    model = onnx.load(str(path), load_external_data=False)
    if any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer):
        return {"applied": False, "reason": "the graph keeps its weights in external data files"}
    from toolkit.stages.onnx_common import unpacked

    if any(n.name.startswith(PREFIX) for n in unpacked(model.graph).node):
        return {"applied": False, "reason": "the graph has per-token scales already"}
    if unpacked(model.graph) is not model.graph:
        return {"applied": False, "reason": "the graph is token-packed; per-token scales are set before packing"}
    try:
        from toolkit.stages.packing import probe_shapes

        counts = rewrite(model.graph, probe_shapes(model))
        set_opset(model, OPSET)
        onnx.checker.check_model(model)
        from toolkit.stages.packing import batch_invariance

        difference = batch_invariance(model, atol)
    except (NotApplicable, NotPackable) as exc:
        return {"applied": False, "reason": str(exc)}
    except (onnx.checker.ValidationError, *ort_errors()) as exc:
        return {"applied": False, "reason": f"{type(exc).__name__}: {exc}"}
    onnx.save(model, str(path))
    return {**counts, "applied": True, "probe_alone_vs_batched": difference,
            "seconds": round(time.perf_counter() - start, 2)}  # fmt: skip
