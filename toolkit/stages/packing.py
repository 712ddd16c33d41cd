"""Token packing: the per-token work of a fused-attention graph (projections, FFN, LayerNorm, GELU, residual
adds, activation quantization) runs on the real tokens of a call only, not on its padding.

A call pads every text to its longest (39 % of the tokens of the full recipe's batch-32 calls, after length
bucketing); only attention needs the padded `[batch, seq, hidden]` layout. The rewrite gathers each attention
output's real tokens into `[tokens, width]` and, before the next attention, gathers them back into the padded layout
(a padding position takes any real row: attention masks it, and a copy changes no quantization range). Graph inputs
and outputs are unchanged; in FP32 every real token's value is the same as before.

Which tensors are per-token comes from running the graph once on a probe batch of an unusual shape, not from shape
inference (ONNX Runtime's symbolic shape inference gives up on quantized contrib-op graphs).
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from toolkit.stages.onnx_common import (
    EXTERNAL_DATA,
    PACKING_IF,
    external_data,
    tensor_session,
    topological_sort,
    unpacked,
)

ATTENTION_OPS = ("Attention", "QAttention", "MultiHeadAttention")
# Ops that only read a tensor's shape: a padded copy of a packed tensor has the shape the original had.
SHAPE_OPS = ("Shape", "Size")
# Reductions over the last axis (a token's own features) only: per token.
LAST_AXIS_REDUCTIONS = ("ReduceMax", "ReduceMin", "ReduceMean", "ReduceSum")
# Ops that treat each token on its own (DynamicQuantizeLinear's range spans the call, padded or packed alike;
# a padded call's range also took the padding positions' values, a packed one takes only real tokens).
TOKENWISE_OPS = {
    "Add", "Sub", "Mul", "Div", "Cast", "Identity", "Erf", "Tanh", "Relu", "Sigmoid", "Sqrt", "Pow",
    "LayerNormalization", "SkipLayerNormalization", "SimplifiedLayerNormalization", "BiasGelu", "Gelu",
    "FastGelu", "QuickGelu", "BiasAdd", "MatMul", "MatMulInteger", "MatMulIntegerToFloat",
    "DynamicQuantizeMatMul", "DynamicQuantizeLinear", "QuantizeLinear", "DequantizeLinear", "QLinearMatMul",
    "QLinearAdd", "QLinearMul", "Abs", "Neg", "Max", "Min", "Split", *LAST_AXIS_REDUCTIONS,
}  # fmt: skip
# token x weight only: which input is the weight (never a per-token tensor)
WEIGHT_INPUT = {"MatMul": 1, "MatMulInteger": 1, "MatMulIntegerToFloat": 1, "DynamicQuantizeMatMul": 1,
                "QLinearMatMul": 3}  # fmt: skip
PROBE = (3, 7)  # batch, sequence: a shape no hidden width has
HAS_PADDING = "pack/has_padding"


def ort_errors() -> tuple[type[Exception], ...]:
    from onnxruntime.capi import onnxruntime_pybind11_state as state

    # NotImplemented: a kernel the probe's CPU provider lacks (FP16 fused attention); EPFail: a provider's failure.
    return (state.Fail, state.InvalidArgument, state.InvalidGraph, state.RuntimeException, state.NotImplemented,
            state.EPFail)  # fmt: skip


class NotPackable(Exception):
    """The graph has a tensor or op the rewrite does not know how to carry; it is left as it was."""


def probe_shapes(model) -> dict[str, tuple]:
    """Every tensor's shape on a probe batch of PROBE's shape."""
    session = tensor_session(model, [o for n in model.graph.node for o in n.output if o])
    values = session.run(None, probe_feed(session, np.ones(PROBE, dtype=np.int64)))
    return {o.name: v.shape for o, v in zip(session.get_outputs(), values, strict=True)}


def probe_feed(session, mask: np.ndarray, ids: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Inputs for a BERT-family graph: token ids (5, a real token in any vocabulary, unless `ids` are given), the
    mask, token types 0."""
    feed = {}
    for i in session.get_inputs():
        dtype = np.int32 if "int32" in i.type else np.int64
        if i.name == "input_ids":
            value = np.full(mask.shape, 5) if ids is None else ids
        else:
            value = mask if i.name == "attention_mask" else np.zeros(mask.shape)
        feed[i.name] = value.astype(dtype)
    return feed


class Packer:
    """The index tensors (computed once per call from `attention_mask`) and the pack/unpack nodes."""

    def __init__(self, graph, shapes: dict[str, tuple]):
        from onnx import helper, numpy_helper

        self.graph, self.shapes, self.helper = graph, shapes, helper
        self.nodes: list = []
        self.made: dict[str, str] = {}
        for name, value in (("minus_one", [-1]), ("zero", 0), ("one", 1)):
            graph.initializer.append(numpy_helper.from_array(np.array(value, dtype=np.int64), f"pack/{name}"))
        self.add("Cast", ["attention_mask"], "pack/mask", to=7)  # int64
        self.add("Reshape", ["pack/mask", "pack/minus_one"], "pack/mask_flat")
        self.add("NonZero", ["pack/mask_flat"], "pack/nonzero")
        self.add("Reshape", ["pack/nonzero", "pack/minus_one"], "pack/rows")  # flat position of each real token
        # Packed row of each padded position (a padding position: row 0, any real row serves).
        self.add("CumSum", ["pack/mask_flat", "pack/zero"], "pack/count")
        self.add("Sub", ["pack/count", "pack/one"], "pack/row_index")
        self.add("Mul", ["pack/row_index", "pack/mask_flat"], "pack/row_flat")
        self.add("Shape", ["attention_mask"], "pack/batch_seq")
        self.add("Reshape", ["pack/row_flat", "pack/batch_seq"], "pack/row_of")

    def add(self, op: str, inputs: list[str], output: str, **attrs) -> str:
        self.nodes.append(self.helper.make_node(op, inputs, [output], name=output, **attrs))
        return output

    def pack(self, name: str, output: str | None = None) -> str:
        """`[batch, seq, width]` -> `[tokens, width]` (named `output`), real tokens only."""
        if f"pack:{name}" not in self.made:
            shape = self.shapes[name]
            if len(shape) != 3:
                raise NotPackable(f"{name} has shape {shape}, not [batch, seq, width]")
            width = f"pack/width_{shape[2]}"
            if not any(t.name == width for t in self.graph.initializer):
                from onnx import numpy_helper

                self.graph.initializer.append(numpy_helper.from_array(np.array([-1, shape[2]], dtype=np.int64), width))
            flat = self.add("Reshape", [name, width], f"{name}/flat")
            self.made[f"pack:{name}"] = self.add("Gather", [flat, "pack/rows"], output or f"{name}/packed", axis=0)
        return self.made[f"pack:{name}"]

    def unpack(self, name: str) -> str:
        """`[tokens, width]` -> `[batch, seq, width]`, a padding position holding a copy of a real row."""
        if f"unpack:{name}" not in self.made:
            self.made[f"unpack:{name}"] = self.add("Gather", [name, "pack/row_of"], f"{name}/unpacked", axis=0)
        return self.made[f"unpack:{name}"]

    def rows_at(self, position: str) -> str:
        """The packed row of each text's token at `position` (an int64 scalar): `[batch]`."""
        if f"rows_at:{position}" not in self.made:
            self.made[f"rows_at:{position}"] = self.add(
                "Gather", ["pack/row_of", position], f"pack/rows_at_{position}", axis=1
            )
        return self.made[f"rows_at:{position}"]


def last_axis_only(node, constants: dict[str, np.ndarray]) -> bool:
    """A reduction reads one token's features only when its axes are the last one; a Split likewise."""
    attrs = {a.name: a for a in node.attribute}
    if node.op_type == "Split":  # without an axis it splits axis 0: the tokens, once packed
        return "axis" in attrs and attrs["axis"].i in (-1, 2)
    if node.op_type not in LAST_AXIS_REDUCTIONS:
        return True
    axes = constants.get(node.input[1]) if len(node.input) > 1 else None
    if axes is None and "axes" in attrs:
        axes = np.array(attrs["axes"].ints)
    # the axis is kept (a per-token [tokens, 1] stays per token) and named -1 (it stays right once packed)
    keeps = "keepdims" not in attrs or attrs["keepdims"].i == 1
    return keeps and axes is not None and axes.size == 1 and int(axes.reshape(-1)[0]) == -1


def is_token(shape: tuple | None) -> bool:
    return shape is not None and len(shape) >= 3 and tuple(shape[:2]) == PROBE


def small_operand(name: str, constants: dict[str, np.ndarray], shapes: dict[str, tuple], weight: bool) -> bool:
    """A weight (`weight`: a MatMul's second input), bias, scale or zero point: the same for every token, and of a
    rank that broadcasts over `[tokens, width]` as it did over `[batch, seq, width]`."""
    if name == "":
        return True
    shape = constants[name].shape if name in constants else shapes.get(name)
    if shape is None or len(shape) > 2 or (len(shape) == 2 and not weight and shape[0] != 1):
        return False
    return name in constants or not set(shape) & {*PROBE, PROBE[0] * PROBE[1]}


def scalar_position(node, constants: dict[str, np.ndarray]) -> bool:
    """A `hidden[:, k]` pooler: Gather on axis 1 with a constant scalar index."""
    axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
    index = constants.get(node.input[1])
    return axis == 1 and index is not None and index.ndim == 0


def constants_of(graph) -> dict[str, np.ndarray]:
    """Initializers and `Constant` node outputs by name."""
    from onnx import numpy_helper

    constants = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    constants.update({n.output[0]: numpy_helper.to_array(n.attribute[0].t) for n in graph.node
                      if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value"})  # fmt: skip
    return constants


def readers_of(graph) -> dict[str, list]:
    """Tensor name -> the nodes that read it."""
    readers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    return readers


def rewrite(graph, shapes: dict[str, tuple]) -> dict:
    constants = constants_of(graph)
    packer = Packer(graph, shapes)
    packed: set[str] = set()
    counts = {"attention": 0, "tokenwise": 0, "unpacked_for": []}
    readers = readers_of(graph)
    for node in list(graph.node):
        if node.op_type in ATTENTION_OPS:
            for k, name in enumerate(node.input):
                if name in packed:
                    node.input[k] = packer.unpack(name)
            out = node.output[0]
            taken = readers.get(out, [])
            if taken and all(r.op_type == "Gather" and scalar_position(r, constants) for r in taken):
                continue  # read at one position only (a pooled tail, `toolkit.stages.pooled`): nothing to pack
            node.output[0] = f"{out}/padded"
            shapes[node.output[0]] = shapes[out]
            packer.pack(node.output[0], output=out)
            packed.add(out)
            counts["attention"] += 1
            continue
        if not packed.intersection(node.input):
            continue
        if node.op_type in TOKENWISE_OPS and last_axis_only(node, constants):
            for k, name in enumerate(node.input):
                if name in packed:
                    continue
                weight = WEIGHT_INPUT.get(node.op_type) == k
                if is_token(shapes.get(name)) and not weight:
                    node.input[k] = packer.pack(name)  # a residual from before the first attention
                elif not small_operand(name, constants, shapes, weight):
                    shape = constants[name].shape if name in constants else shapes.get(name)
                    raise NotPackable(f"{node.op_type} {node.name!r} reads {name} {shape}, not per token")
            for attr in node.attribute:
                if attr.name == "axis" and attr.i not in (-1, 2):
                    raise NotPackable(f"{node.op_type} {node.name!r} works on axis {attr.i}")
                if attr.name == "axis":
                    attr.i = -1
            packed.update(o for o in node.output if is_token(shapes.get(o)))
            counts["tokenwise"] += 1
        elif node.op_type == "Gather" and node.input[0] in packed and scalar_position(node, constants):
            node.input[1] = packer.rows_at(node.input[1])
            next(a for a in node.attribute if a.name == "axis").i = 0
            counts["unpacked_for"].append("pooler Gather (its rows only)")
        elif node.op_type in SHAPE_OPS:
            for k, name in enumerate(node.input):
                if name in packed:
                    node.input[k] = packer.unpack(name)
            counts["unpacked_for"].append(node.op_type)
        else:
            # A padding position of an unpacked tensor holds a copy of another token: only attention (which masks
            # it), shape ops and the pooled row may read one. Anything else (a masked mean, a custom head) would
            # read the copies as if they were the text's own tokens.
            raise NotPackable(f"{node.op_type} {node.name!r} reads per-token values across tokens; packing would "
                              "show it copies of other tokens where the padding was")  # fmt: skip
    for output in graph.output:
        if output.name in packed:
            raise NotPackable(f"graph output {output.name} is per token")
    if not counts["attention"]:
        attentions = any(n.op_type in ATTENTION_OPS for n in graph.node)
        raise NotPackable(
            "every attention output is read at one position only (a pooled tail): no per-token work to pack"
            if attentions
            else "no fused attention (Attention or QAttention) to pack around"
        )
    graph.node.extend(packer.nodes)
    topological_sort(graph)
    del graph.value_info[:]  # shapes of the rewritten tensors changed
    return counts


def wrap(plain, packed):
    """One graph that runs `packed` when the call has padding and `plain` when it has none (a call of one text, or
    of texts of one length): packing would only add its gathers there. The weights stay in the outer graph, which
    both branches read."""
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.ModelProto()
    model.CopyFrom(plain)
    outputs = [o.name for o in plain.graph.output]
    branches = [branch(g, outputs, tag) for g, tag in ((packed.graph, "packed"), (plain.graph, "padded"))]
    # The plain branch keeps the shapes the graph had: ONNX Runtime's shape-dependent fusions (SkipLayerNorm)
    # then treat it as they treat the graph unpacked.
    branches[1].value_info.extend(v for v in plain.graph.value_info if v.name not in outputs)
    zero = numpy_helper.from_array(np.array(0, dtype=np.int64), "pack/no_token")
    graph = model.graph
    del graph.node[:], graph.initializer[:], graph.value_info[:]
    graph.initializer.extend([*packed.graph.initializer, zero])
    graph.node.extend([
        helper.make_node("ReduceMin", ["attention_mask"], ["pack/min_mask"], name=HAS_PADDING + "/min", keepdims=0),
        helper.make_node("Equal", ["pack/min_mask", zero.name], [HAS_PADDING], name=HAS_PADDING),
        helper.make_node("If", [HAS_PADDING], outputs, name=PACKING_IF, then_branch=branches[0],
                         else_branch=branches[1]),
    ])  # fmt: skip
    onnx.checker.check_model(model)
    return model


def branch(graph, outputs: list[str], tag: str):
    """`graph`'s nodes as an If branch: no inputs or weights of its own (both come from the outer graph), its
    outputs renamed (a branch may not redefine a name of the outer graph)."""
    from onnx import helper

    renamed = {name: f"{name}/{tag}" for name in outputs}
    nodes, results = [copy_of(n) for n in graph.node], [copy_of(v) for v in graph.output]
    for node in nodes:
        node.input[:] = [renamed.get(i, i) for i in node.input]
        node.output[:] = [renamed.get(o, o) for o in node.output]
    for value in results:
        value.name = renamed[value.name]
    return helper.make_graph(nodes, tag, [], results)


def copy_of(message):
    copy = type(message)()
    copy.CopyFrom(message)
    return copy


def probe_answers(original, model) -> list[tuple[np.ndarray, np.ndarray]]:
    """Both graphs' outputs (original, rewritten) at full optimization on a padded probe batch, then an unpadded
    one: what a graph rewrite checks itself against."""
    padded = np.ones(PROBE, dtype=np.int64)
    padded[1, 4:] = padded[2, 2:] = 0
    ids = probe_ids(padded, vocabulary=vocabulary_size(original))
    sessions = [session_of(m) for m in (original, model)]
    return [
        tuple(s.run(None, probe_feed(s, mask, ids))[0] for s in sessions)
        for mask in (padded, np.ones(PROBE, dtype=np.int64))
    ]


def alone(session, mask: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Each probe text's answer in a call of its own, cut to its length."""
    rows = [session.run(None, probe_feed(session, mask[r : r + 1, :n], ids[r : r + 1, :n]))[0][0]
            for r, n in enumerate(mask.sum(axis=1))]  # fmt: skip
    return np.stack(rows)


def check_answers(model, original, atol: float = 1e-4) -> dict:
    """The packed graph judged by its numbers, not its shapes: on padded probe batches (texts of several lengths,
    different tokens), each text's answer must be the original graph's answer for that text alone, to `atol`.
    A graph with per-call INT8 scales answers a text alone differently anyway; it is allowed twice its own
    difference between alone and batched. On an unpadded probe the plain branch must answer as the original."""
    per_call = any(n.op_type == "DynamicQuantizeLinear" for n in original.graph.node)
    new, old = session_of(model), session_of(original)
    worst, allowed = 0.0, atol
    for lengths in ((7, 4, 2, 6), (3, 9, 9, 1, 5)):
        mask = probe_mask(lengths)
        ids = probe_ids(mask, seed=len(lengths), vocabulary=vocabulary_size(original))
        expected = alone(old, mask, ids)
        if per_call:
            batched = old.run(None, probe_feed(old, mask, ids))[0]
            allowed = max(allowed, 2 * float(np.abs(batched - expected).max()))
        answers = new.run(None, probe_feed(new, mask, ids))[0]
        if answers.shape != expected.shape or not np.isfinite(answers).all():
            raise NotPackable(f"the packed graph answers {answers.shape}, the original {expected.shape}")
        worst = max(worst, float(np.abs(answers - expected).max()))
    if not worst <= allowed:
        raise NotPackable(f"the packed graph answers padded texts up to {worst:.2g} off the original (allowed "
                          f"{allowed:.2g})")  # fmt: skip
    before, after = probe_answers(original, model)[
        -1
    ]  # unpadded: within rounding (a branch may order kernels otherwise)
    if not np.allclose(before, after, rtol=1e-4, atol=1e-5):
        raise NotPackable(f"the plain branch answers up to {np.abs(before - after).max():.2g} off the original")
    return {"probe_max_difference": worst, "probe_allowed": allowed}


def pack_tokens(path: Path) -> dict:
    """Rewrite the ONNX file at `path` in place where it can be packed; returns what the manifest records."""
    import onnx

    start = time.perf_counter()
    original = onnx.load(str(path), load_external_data=False)
    if external_data(original):
        return {"applied": False, "reason": EXTERNAL_DATA}
    if "attention_mask" not in {i.name for i in original.graph.input}:
        return {"applied": False, "reason": "the graph takes no attention_mask (nothing is padded)"}
    if unpacked(original.graph) is not original.graph:
        return {"applied": False, "reason": "the graph is packed already"}
    packed = onnx.ModelProto()
    packed.CopyFrom(original)
    try:
        counts = rewrite(packed.graph, probe_shapes(original))
        model = wrap(original, packed)
        checked = check_answers(model, original)
    except NotPackable as exc:
        return {"applied": False, "reason": str(exc)}
    except ort_errors() as exc:  # the probe could not run the graph (inputs of another kind): left as it was
        return {"applied": False, "reason": f"{type(exc).__name__}: {exc}"}
    onnx.save(model, str(path))
    return {"applied": True, **counts, **checked, "seconds": round(time.perf_counter() - start, 2)}


def probe_ids(mask: np.ndarray, seed: int = 0, vocabulary: int = 100) -> np.ndarray:
    """Token ids for a probe: different in every position and text (ids below 100 and below the vocabulary's
    size), so that rows and tokens differ as real texts do."""
    return np.random.default_rng(seed).integers(1, min(100, vocabulary), size=mask.shape)


def vocabulary_size(model) -> int:
    """Rows of the table `input_ids` are looked up in (100 when it cannot be told)."""
    tables = {t.name: t.dims for t in model.graph.initializer}
    for node in unpacked(model.graph).node:
        if node.op_type == "Gather" and node.input[1] == "input_ids" and node.input[0] in tables:
            return int(tables[node.input[0]][0])
        if node.op_type == "EmbedLayerNormalization" and len(node.input) > 2 and node.input[2] in tables:
            return int(tables[node.input[2]][0])
    return 100


def probe_mask(lengths: tuple[int, ...] = (7, 4, 2, 6)) -> np.ndarray:
    return (np.arange(max(lengths)) < np.array(lengths)[:, None]).astype(np.int64)


def session_of(model):
    import onnxruntime as ort

    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def batch_invariance(model, atol: float) -> float:
    """The largest logit difference between a padded probe batch and each of its texts run alone (cut to its
    length); more than `atol` is a refusal."""
    session = session_of(model)
    mask = probe_mask()
    ids = probe_ids(mask, vocabulary=vocabulary_size(model))
    together = session.run(None, probe_feed(session, mask, ids))[0]
    worst = 0.0
    for row, length in enumerate(mask.sum(axis=1)):
        alone = session.run(None, probe_feed(session, mask[row : row + 1, :length], ids[row : row + 1, :length]))[0]
        worst = max(worst, float(np.abs(alone[0] - together[row]).max()))
    if not worst <= atol:
        raise NotPackable(f"a text's answer alone and in a padded batch differ by up to {worst:.2g} (allowed {atol})")
    return worst
