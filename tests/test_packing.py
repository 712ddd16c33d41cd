"""Token packing: a call with padding runs its per-token work on the real tokens only, and answers as before."""

from __future__ import annotations

import shutil

import numpy as np
import onnx

from toolkit.runtime import load_model, onnx_file
from toolkit.stages.packing import HAS_PADDING, pack_tokens

# Lengths differ, so a batch of them pads; the same text twice does not.
TEXTS = ["the movie was good", "awful plot and it was dull, slow and long", "a story", "brilliant, lovely film"]


def packed_copy(folder, tmp_path, name):
    copy = shutil.copytree(folder, tmp_path / name)
    return copy, pack_tokens(onnx_file(copy))


def test_packed_fp32_graph_answers_as_the_padded_one(graphs, tmp_path):
    folder, info = packed_copy(graphs / "optimize", tmp_path, "fp32")

    assert info["applied"] is True and info["attention"] == 2  # one fused attention per layer of the tiny model
    assert info["unpacked_for"] == ["pooler Gather (its rows only)"]  # nothing else needs the padded layout
    graph = onnx.load(str(onnx_file(folder))).graph
    assert [n.op_type for n in graph.node] == ["ReduceMin", "Equal", "If"]
    packed_branch = next(a.g for a in graph.node[-1].attribute if a.name == "then_branch")
    assert sum(n.op_type == "NonZero" for n in packed_branch.node) == 1

    before = load_model(graphs / "optimize", "onnx", 16, 1, "cpu")
    after = load_model(folder, "onnx", 16, 1, "cpu")
    # Padded call (the packed branch) and one text per call (the plain branch), against the unpacked graph.
    np.testing.assert_allclose(after.logits(TEXTS), before.logits(TEXTS), atol=1e-5)
    np.testing.assert_allclose(after.logits_batched(TEXTS, 1), before.logits_batched(TEXTS, 1), atol=1e-5)
    # One padded call (no length buckets) gives each text its answer alone.
    alone = np.concatenate([after.run(after.tokenizer([t])) for t in TEXTS])
    np.testing.assert_allclose(after.run(after.tokenizer(TEXTS)), alone, atol=1e-5)


def test_packed_int8_graph_keeps_the_int8_answers(graphs, tmp_path):
    quantized = graphs / "quantize"
    entry = onnx.load(str(onnx_file(quantized))).graph
    assert entry.node[-1].op_type == "If"  # the quantize stage packs by default

    unpacked = load_model(graphs / "optimize", "onnx", 16, 1, "cpu").logits(TEXTS)
    packed = load_model(quantized, "onnx", 16, 1, "cpu").logits(TEXTS)
    assert (packed.argmax(-1) == unpacked.argmax(-1)).all()
    np.testing.assert_allclose(packed, unpacked, atol=0.05)


def test_graphs_packing_cannot_help_are_left_as_they_are(graphs, tmp_path):
    folder, info = packed_copy(graphs / "export", tmp_path, "unfused")
    assert info == {"applied": False, "reason": "no fused attention (Attention or QAttention) to pack around"}
    assert onnx_file(folder).read_bytes() == onnx_file(graphs / "export").read_bytes()

    _, again = packed_copy(graphs / "quantize", tmp_path, "twice")
    assert again == {"applied": False, "reason": "the graph is packed already"}

    external = shutil.copytree(graphs / "optimize", tmp_path / "external")
    model = onnx.load(str(onnx_file(external)))
    onnx.save(model, str(onnx_file(external)), save_as_external_data=True, size_threshold=0)
    assert pack_tokens(onnx_file(external)) == {
        "applied": False,
        "reason": "the graph keeps its weights in external data files",
    }


def test_quantize_records_packing_and_can_leave_it_out(graphs, tmp_path):
    from toolkit.config import QuantizeConfig
    from toolkit.stages import quantize
    from toolkit.stages.base import Artifact, StageContext

    results = {}
    for pack in (True, False):
        out = tmp_path / f"q{pack}"
        out.mkdir()
        ctx = StageContext(run_dir=tmp_path, out_dir=out, source=Artifact(graphs / "optimize", "onnx", "optimize"))
        results[pack] = quantize.run(QuantizeConfig(type="quantize", smooth_quant=None, pack_tokens=pack), ctx)
    assert results[True].info["pack_tokens"]["applied"] is True
    assert "pack_tokens" not in results[False].info
    # The op counts are those of the graph both branches run, packed or not.
    assert results[True].info["op_counts"] == results[False].info["op_counts"]
    names = {n.name for n in onnx.load(str(onnx_file(results[False].artifact.path))).graph.node}
    assert HAS_PADDING not in names
