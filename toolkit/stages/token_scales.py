"""INT8 activation scales that do not depend on the other texts in a model call.

ONNX Runtime's dynamic INT8 (`DynamicQuantizeLinear`) takes one activation scale and zero point per tensor, that is
per model call: a text's INT8 input to every matrix product depends on the largest value of any token of any text
it shares the call with. The service merges unrelated clients' requests into one call, so one client's text could
change another's class (7 of 2,040 texts of the full recipe's INT8 changed class between alone and calls of 32; AMD
EPYC, 2026-12-07). Two rewrites of a dynamically quantized graph remove that:

- `calibrated_scales` (the default): each activation tensor gets a fixed symmetric scale, the largest |x| of its
  real tokens over the calibration texts / 127 (zero point 128), applied by `QuantizeLinear`; each product becomes
  one `MatMulIntegerToFloat` with the scale folded into the weight's per-channel scales and the bias Add folded in,
  and a fused `QAttention` takes the fixed scale as it is. As many ops as ONNX Runtime's fused dynamic INT8.
- `per_token_scales`: every token gets its own scale from standard ops: `max |x|` over the token's features
  (`Abs`, `ReduceMax` on the last axis), symmetric INT8 around a zero point of 128 (uint8, the operand ONNX
  Runtime's VNNI kernels take), quantized by blocked `QuantizeLinear` (opset 21, one block per token). The product
  is `MatMulIntegerToFloat` with the token's scale as its (per-row) A scale and the weight's per-channel scales. A
  fused `QAttention` (whose input scale must be one number) becomes one such product for the Q, K and V
  projections, a `Split`, and ONNX Runtime's `MultiHeadAttention`. Products on pooled rows (`[batch, width]`: the
  pooled tail and the classifier head) run in float on the dequantized weights: a few rows, where the per-token
  scale's ops cost more than INT8 saves. Nothing saturates; about four ops per quantized tensor instead of one.

Both leave a product of two activations (an unfused attention's) in float, and check a padded probe batch against
each of its texts alone.
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
        """`out` = the token's INT8 row times the INT8 weight, scaled by the token's scale (`[..., 1]`, one per row:
        MatMulIntegerToFloat takes it as its A scale) and the weight's scales. Its bias input is left out: with a
        per-row A scale ONNX Runtime multiplies the bias by it too, so the graph's own bias Add stays."""
        inputs = [quantized, weight, scale, weight_scale, PREFIX + "zero_point", weight_zero]
        self.add("MatMulIntegerToFloat", inputs, out, domain="com.microsoft")
        self.nodes[-1].name = f"{PREFIX}{out}"
        return out


def rescaled(node, readers, producers) -> tuple[object, object | None]:
    """The MatMulInteger -> Cast -> Mul chain ONNX Runtime's dynamic INT8 writes: (the rescaling Mul, the
    `Mul(call scale, weight scales)` node that made its scale, or None)."""
    cast = only_reader(node.output[0], "Cast", readers)
    rescale = only_reader(cast.output[0], "Mul", readers)
    scales = producers.get(rescale.input[1])
    return rescale, scales if scales is not None and scales.op_type == "Mul" else None


def rewrite_matmul(node, quantized: str, scale: str, b: Builder, readers, producers) -> None:
    """MatMulInteger -> Cast -> Mul(call scale x weight scales) becomes one product on the token's INT8 row."""
    rescale, scales = rescaled(node, readers, producers)
    if scales is None or scales.input[0] != producers[node.input[0]].output[1]:
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
    # One product for Q, K and V (three products of the same INT8 tokens ran no faster and are more ops).
    qkv = b.product(quantized, weight, weight_scale, weight_zero, scale, f"{p}/qkv")
    parts = [f"{p}/{name}" for name in "qkv"]
    b.nodes.append(helper.make_node("Split", [qkv], parts, name=f"{p}/split", axis=-1, num_outputs=3))
    extra = {k: v for k, v in attrs.items() if k == "mask_filter_value"}
    b.nodes.append(
        helper.make_node(
            "MultiHeadAttention", [*parts, bias, mask], list(node.output), name=f"{p}/attention",
            domain="com.microsoft", num_heads=attrs["num_heads"], **extra,
        )
    )  # fmt: skip
    b.graph.node.remove(node)


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

    rescale, _ = rescaled(node, readers, producers)
    sources = [producers.get(name) for name in node.input[:2]]
    if any(p is None or p.op_type != "DynamicQuantizeLinear" for p in sources):
        raise NotApplicable(f"MatMulInteger {node.name!r} does not read two dynamically quantized tensors")
    graph.node.append(helper.make_node("MatMul", [p.input[0] for p in sources], [rescale.output[0]],
                                       name=f"{PREFIX}{node.name}/float"))  # fmt: skip
    graph.node.remove(rescale)


def float_product(node, x: str, graph, constants, readers, producers) -> None:
    """MatMulInteger on pooled rows (`[batch, width]`: the pooled tail and the classifier head) as a float MatMul
    on the dequantized weight: a handful of rows, where the four ops of a per-token scale cost more than the INT8
    product saves, and float is closer to the source."""
    from onnx import helper, numpy_helper

    rescale, made = rescaled(node, readers, producers)
    weight = constants[node.input[1]].astype(np.float32)
    zero = constants.get(node.input[3], np.zeros(1)) if len(node.input) > 3 and node.input[3] else np.zeros(1)
    scales = constants.get(made.input[1]) if made is not None else None
    if scales is None:
        raise NotApplicable(f"{node.name!r}: its weight scales are not a constant")
    name = f"{PREFIX}{node.input[1]}/dequantized"
    graph.initializer.append(numpy_helper.from_array(((weight - zero) * scales).astype(np.float32), name))
    graph.node.append(helper.make_node("MatMul", [x, name], [rescale.output[0]], name=f"{PREFIX}{node.name}/float"))
    graph.node.remove(rescale)


def float_activation_products(graph) -> int:
    """Every MatMulInteger of two activations left in float (see `activation_product`); returns how many."""
    constants, readers = constants_of(graph), readers_of(graph)
    producers = {o: n for n in graph.node for o in n.output}
    found = [n for n in graph.node if n.op_type == "MatMulInteger" and n.input[1] not in constants]
    for node in found:
        activation_product(node, graph, readers, producers)
    drop_unread(graph)
    return len(found)


def width_of(node, constants) -> int:
    weight = constants.get(node.input[1])
    if weight is None or weight.ndim != 2:
        raise NotApplicable(f"{node.op_type} {node.name!r} has no 2-D constant weight")
    return int(weight.shape[0])


def rewrite(graph, shapes: dict[str, tuple]) -> dict:
    from toolkit.stages.onnx_common import topological_sort

    left = float_activation_products(graph)
    constants, readers = constants_of(graph), readers_of(graph)
    producers = {o: n for n in graph.node for o in n.output}
    counts = {"tokens_scaled": 0, "products": 0, "attentions": 0, "left_in_float": left, "pooled_in_float": 0}
    for node in [n for n in graph.node if n.op_type == "MatMulInteger"]:
        if len(shapes.get(producers[node.input[0]].input[0], ())) == 2:
            float_product(node, producers[node.input[0]].input[0], graph, constants, readers, producers)
            counts["pooled_in_float"] += 1
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
    """Rewrite the dynamically quantized ONNX file at `path` in place with per-token scales; returns what the
    manifest records."""

    def apply(model) -> dict:
        from toolkit.stages.packing import probe_shapes

        counts = rewrite(model.graph, probe_shapes(model))
        set_opset(model, OPSET)
        return counts

    return rewritten(path, apply, atol)


def close_to(model, original) -> float:
    """The largest logit difference to the per-call graph on each probe text alone; a rewrite that moves a logit by
    more than a quarter of the largest one (a scale folded twice, a bias scaled by the token's scale) is refused.
    Both are INT8 of the same weights, so they differ by quantization noise only."""
    from toolkit.stages.packing import alone, probe_ids, probe_mask, session_of, vocabulary_size

    mask = probe_mask()
    ids = probe_ids(mask, vocabulary=vocabulary_size(original))
    before, after = (alone(session_of(m), mask, ids) for m in (original, model))
    worst = float(np.abs(after - before).max())
    if not worst <= 0.25 * max(float(np.abs(before).max()), 1e-3):
        raise NotApplicable(f"the rewritten graph answers up to {worst:.2g} off the per-call graph on probe texts")
    return worst


def rewritten(path: Path, rewrite_graph, atol: float) -> dict:
    """`rewrite_graph(model) -> counts` on the ONNX file at `path`, kept only if the result passes the ONNX checker
    and answers a padded probe batch as it answers each of its texts alone (to `atol`); else the file is left as it
    was and the reason returned."""
    import onnx

    from toolkit.stages.onnx_common import EXTERNAL_DATA, external_data, unpacked
    from toolkit.stages.packing import NotPackable, batch_invariance, ort_errors

    start = time.perf_counter()
    model = onnx.load(str(path), load_external_data=False)
    if external_data(model):
        return {"applied": False, "reason": EXTERNAL_DATA}
    if any(n.name.startswith(PREFIX) for n in unpacked(model.graph).node):
        return {"applied": False, "reason": "the graph's activation scales are rewritten already"}
    if unpacked(model.graph) is not model.graph:
        return {"applied": False, "reason": "the graph is token-packed; activation scales are rewritten before"}
    original = onnx.ModelProto()
    original.CopyFrom(model)
    try:
        counts = rewrite_graph(model)
        onnx.checker.check_model(model)
        difference = batch_invariance(model, atol)
        counts["probe_vs_per_call"] = close_to(model, original)
    except (NotApplicable, NotPackable) as exc:
        return {"applied": False, "reason": str(exc)}
    except (onnx.checker.ValidationError, *ort_errors()) as exc:
        return {"applied": False, "reason": f"{type(exc).__name__}: {exc}"}
    onnx.save(model, str(path))
    return {**counts, "applied": True, "probe_alone_vs_batched": difference,
            "seconds": round(time.perf_counter() - start, 2)}  # fmt: skip


def calibrated_rewrite(graph, peaks: dict[str, float]) -> dict:
    """Each DynamicQuantizeLinear becomes QuantizeLinear with a fixed symmetric scale (the calibration texts' largest
    |x| / 127, zero point 128); each product it fed becomes one MatMulIntegerToFloat with that scale folded into the
    weight's scales (and the bias Add after it, where there is one); QAttention takes the fixed scale as it is."""
    from onnx import helper, numpy_helper

    from toolkit.stages.onnx_common import topological_sort

    constants, readers = constants_of(graph), readers_of(graph)
    producers = {o: n for n in graph.node for o in n.output}
    graph.initializer.extend([numpy_helper.from_array(np.array(ZERO_POINT, dtype=np.uint8), PREFIX + "zero_point"),
                              numpy_helper.from_array(np.array(1.0, dtype=np.float32), PREFIX + "one")])  # fmt: skip
    counts = {"tensors": 0, "products": 0, "attentions": 0, "biases_folded": 0}
    replaced: dict[str, str] = {}
    for dql in [n for n in graph.node if n.op_type == "DynamicQuantizeLinear"]:
        x, quantized, call_scale, call_zero = dql.input[0], *dql.output
        scale = np.float32(max(peaks[x], 1e-8) / 127)
        fixed = f"{PREFIX}{x}/scale"
        graph.initializer.append(numpy_helper.from_array(np.array(scale, dtype=np.float32), fixed))
        graph.node.append(helper.make_node("QuantizeLinear", [x, fixed, PREFIX + "zero_point"], [quantized],
                                           name=f"{PREFIX}{x}/quantize"))  # fmt: skip
        graph.node.remove(dql)
        for user in readers.get(quantized, []):
            if user.op_type == "QAttention":
                user.input[3], user.input[6] = fixed, PREFIX + "zero_point"
                counts["attentions"] += 1
            elif user.op_type == "MatMulInteger" and user.input[1] in constants:
                counts["biases_folded"] += fixed_product(user, scale, graph, constants, readers, producers)
                counts["products"] += 1
            else:
                raise NotApplicable(f"{quantized} is read by {user.op_type} {user.name!r}")
        replaced.update({call_scale: x, call_zero: x})
        counts["tensors"] += 1
    if not counts["tensors"]:
        raise NotApplicable("no DynamicQuantizeLinear: the graph has no per-call activation scales")
    drop_unread(graph)
    still = sorted({replaced[i] for n in graph.node for i in n.input if i in replaced})
    if still:
        raise NotApplicable(f"the call scale of {still[0]} is read outside the products it fed")
    topological_sort(graph)
    return counts


def fixed_product(node, scale: np.float32, graph, constants, readers, producers) -> int:
    """MatMulInteger -> Cast -> Mul(call scale x weight scales) [-> Add(bias)] as one MatMulIntegerToFloat; returns
    1 when the bias Add was folded in."""
    from onnx import helper, numpy_helper

    rescale, scales = rescaled(node, readers, producers)
    if scales is None or scales.input[1] not in constants:
        raise NotApplicable(f"{node.name!r}: its product is not rescaled by call scale x weight scale")
    folded = f"{PREFIX}{node.name}/scales"
    graph.initializer.append(numpy_helper.from_array((constants[scales.input[1]] * scale).astype(np.float32), folded))
    weight_zero = node.input[3] if len(node.input) > 3 else ""
    inputs = [node.input[0], node.input[1], PREFIX + "one", folded, PREFIX + "zero_point", weight_zero]
    out, last = rescale.output[0], rescale
    after = readers.get(out, [])
    bias = next((i for i in after[0].input if i in constants), None) if len(after) == 1 else None
    columns = constants[node.input[1]].shape[-1]
    if bias is not None and after[0].op_type == "Add" and constants[bias].shape == (columns,):
        inputs.append(bias)  # A scale 1: ONNX Runtime adds the bias unscaled whatever the A scale's shape
        out, last = after[0].output[0], after[0]
        graph.node.remove(after[0])
    graph.node.remove(rescale)
    graph.node.append(helper.make_node("MatMulIntegerToFloat", inputs, [out], name=f"{PREFIX}{node.name}",
                                       domain="com.microsoft"))  # fmt: skip
    return int(last is not rescale)


def calibrated_scales(path: Path, batches, atol: float = 1e-4) -> dict:
    """Rewrite the dynamically quantized ONNX file at `path` in place with fixed activation scales calibrated on
    `batches` (tokenised calibration texts); returns what the manifest records."""

    def apply(model) -> dict:
        left = float_activation_products(model.graph)  # before calibrating: their inputs need no scale
        names = sorted({n.input[0] for n in model.graph.node if n.op_type == "DynamicQuantizeLinear"})
        if not names:
            raise NotApplicable("no DynamicQuantizeLinear: the graph has no per-call activation scales")
        from toolkit.stages.smoothing import activation_maxima

        peaks = {name: float(m.max()) for name, m in activation_maxima(model, names, batches).items()}
        tokens = int(sum(b["attention_mask"].sum() for b in batches))
        return {**calibrated_rewrite(model.graph, peaks), "left_in_float": left, "calibration_tokens": tokens}

    return rewritten(path, apply, atol)
