"""Pooled-token tail: the last layer's per-token work runs on the one token the classifier reads.

A BERT-family classifier reads one position of the last hidden states (`hidden[:, 0]`: BERT's pooler, RoBERTa's
and ELECTRA's heads, DistilBERT's). The last layer's keys and values need every token, but what follows its
attention (output projection, residual add, LayerNorm, the FFN, the last LayerNorm) treats each token on its own,
so only the pooled token's row of it is ever read. The rewrite takes that row right after the last attention (and
of the residual that meets it) and runs the tail on `[batch, width]`: in FP32 the logits are the same, and a 3-layer
student of the full recipe does about a quarter fewer multiply-adds per token.

Which ops make up the tail comes from walking back from the pooler's `Gather` through per-token ops whose every
reader is in the tail; shapes come from running the graph once on a probe batch (as token packing does).
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from toolkit.stages.onnx_common import EXTERNAL_DATA, external_data, topological_sort, unpacked
from toolkit.stages.packing import (
    TOKENWISE_OPS,
    WEIGHT_INPUT,
    constants_of,
    is_token,
    ort_errors,
    probe_answers,
    probe_shapes,
    readers_of,
    scalar_position,
    small_operand,
)

POOLED = "pooled/"  # prefix of the rewrite's tensors and nodes; a graph that has them was rewritten already


class NotApplicable(Exception):
    """The graph has no single `hidden[:, k]` read of per-token states, or nothing per-token before it."""


def the_pooler(graph, shapes: dict, constants: dict):
    poolers = [
        n
        for n in graph.node
        if n.op_type == "Gather" and is_token(shapes.get(n.input[0])) and scalar_position(n, constants)
    ]
    if len(poolers) != 1:
        raise NotApplicable(f"{len(poolers)} reads of one position of the hidden states (hidden[:, k]), not 1")
    return poolers[0]


def in_tail(node, readers: dict, tail: set, shapes: dict, constants: dict) -> bool:
    """A per-token op whose per-token outputs are all read by the tail only (and read at all)."""
    if node.op_type not in TOKENWISE_OPS:
        return False
    if any(a.name == "axis" and a.i not in (-1, 2) for a in node.attribute):
        return False
    outputs = [o for o in node.output if is_token(shapes.get(o))]
    if not outputs or any(id(r) not in tail for o in outputs for r in readers.get(o, [None])):
        return False
    for k, name in enumerate(node.input):
        weight = WEIGHT_INPUT.get(node.op_type) == k
        if not (is_token(shapes.get(name)) and not weight) and not small_operand(name, constants, shapes, weight):
            return False
    return True


def rewrite(graph, shapes: dict[str, tuple]) -> dict:
    from onnx import helper

    constants = constants_of(graph)
    pooler = the_pooler(graph, shapes, constants)
    readers = readers_of(graph)
    outputs = {o.name for o in graph.output}
    tail = {id(pooler)}
    for node in reversed(list(graph.node)):  # readers come after their producers: decided first
        if not outputs.intersection(node.output) and in_tail(node, readers, tail, shapes, constants):
            tail.add(id(node))
    tail.discard(id(pooler))
    if not tail:
        raise NotApplicable(f"the pooled hidden state {pooler.input[0]} comes straight from a non-per-token op")
    position, taken = pooler.input[1], {}
    made_in_tail = {o for node in graph.node if id(node) in tail for o in node.output}
    for node in graph.node:
        if id(node) not in tail:
            continue
        for k, name in enumerate(node.input):
            if is_token(shapes.get(name)) and WEIGHT_INPUT.get(node.op_type) != k and name not in made_in_tail:
                if name not in taken:
                    taken[name] = f"{POOLED}{name}"
                    graph.node.append(helper.make_node("Gather", [name, position], [taken[name]], axis=1,
                                                       name=f"{POOLED}{name}"))  # fmt: skip
                node.input[k] = taken[name]
        for attr in node.attribute:
            if attr.name == "axis":
                attr.i = -1
    # the pooler now reads `[batch, width]` rows already taken
    pooler.op_type, pooler.name = "Identity", f"{POOLED}pooler"
    del pooler.input[1:], pooler.attribute[:]
    topological_sort(graph)
    del graph.value_info[:]  # shapes of the tail's tensors changed
    return {"tail_ops": len(tail), "taken_at": sorted(taken)}


def check_same(model, original, atol: float) -> float:
    """Both graphs on padded and unpadded probe batches: the largest logit difference (within `atol`)."""
    worst = 0.0
    for before, after in probe_answers(original, model):
        if before.shape != after.shape:
            raise NotApplicable(f"the rewritten graph answers {after.shape}, the original {before.shape}")
        worst = max(worst, float(np.abs(before - after).max()))
    if not worst <= atol:
        raise NotApplicable(f"the rewritten graph answers up to {worst:.2g} off the original (allowed {atol})")
    return worst


def pooled_tail(path: Path, atol: float = 1e-4) -> dict:
    """Rewrite the ONNX file at `path` in place where it applies; returns what the manifest records. `atol`: the
    largest logit difference allowed on the probe (FP32: rounding only)."""
    import onnx

    start = time.perf_counter()
    original = onnx.load(str(path), load_external_data=False)
    if external_data(original):
        return {"applied": False, "reason": EXTERNAL_DATA}
    if unpacked(original.graph) is not original.graph:
        return {"applied": False, "reason": "the graph is token-packed; the tail is cut before packing"}
    if any(n.name.startswith(POOLED) for n in original.graph.node):
        return {"applied": False, "reason": "the graph's tail is cut already"}
    model = onnx.ModelProto()
    model.CopyFrom(original)
    try:
        counts = rewrite(model.graph, probe_shapes(original))
        onnx.checker.check_model(model)
        difference = check_same(model, original, atol)
    except NotApplicable as exc:
        return {"applied": False, "reason": str(exc)}
    except (onnx.checker.ValidationError, *ort_errors()) as exc:  # a graph the rewrite cannot carry: left whole
        return {"applied": False, "reason": f"{type(exc).__name__}: {exc}"}
    onnx.save(model, str(path))
    return {
        "applied": True,
        **counts,
        "probe_max_difference": difference,
        "seconds": round(time.perf_counter() - start, 2),
    }
