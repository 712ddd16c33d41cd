"""Graph rewrites of per-token work: token packing (a call with padding runs its per-token work on the real tokens
only) and the pooled tail (the last layer's per-token work on the pooled token only); both answer as before."""

from __future__ import annotations

import shutil

import numpy as np
import onnx

from toolkit.runtime import load_model, onnx_file
from toolkit.stages.packing import HAS_PADDING, pack_tokens
from toolkit.stages.pooled import pooled_tail

# Lengths differ, so a batch of them pads; the same text twice does not.
TEXTS = ["the movie was good", "awful plot and it was dull, slow and long", "a story", "brilliant, lovely film"]


def packed_copy(folder, tmp_path, name):
    copy = shutil.copytree(folder, tmp_path / name)
    return copy, pack_tokens(onnx_file(copy))


def test_packed_fp32_graph_answers_as_the_padded_one(graphs, tmp_path):
    folder, info = packed_copy(graphs / "optimize", tmp_path, "fp32")

    # Of the tiny model's two fused attentions, the last one's output is read only at the pooled token (the
    # optimize stage cut the tail): only the first one's is packed.
    assert info["applied"] is True and info["attention"] == 1
    assert info["unpacked_for"] == ["pooler Gather (its rows only)"]  # the pooled residual; nothing else
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
        results[pack] = quantize.run(
            QuantizeConfig(type="quantize", smooth_quant=None, activation_scales="per_token", pack_tokens=pack), ctx
        )
    assert results[True].info["pack_tokens"]["applied"] is True
    assert "pack_tokens" not in results[False].info
    # The op counts are those of the graph both branches run, packed or not.
    assert results[True].info["op_counts"] == results[False].info["op_counts"]
    names = {n.name for n in onnx.load(str(onnx_file(results[False].artifact.path))).graph.node}
    assert HAS_PADDING not in names


def poolers():
    from onnx import TensorProto, helper

    return {
        "first": [helper.make_node("Gather", ["ln", "first"], ["cls"], axis=1)],
        "mean": [helper.make_node("ReduceMean", ["ln", "axes"], ["cls"], keepdims=0)],
        # sentence-transformers' pooling: the mean of the real tokens only
        "masked_mean": [
            helper.make_node("Cast", ["attention_mask"], ["mask_float"], to=TensorProto.FLOAT),
            helper.make_node("Unsqueeze", ["mask_float", "last"], ["mask3"]),
            helper.make_node("Mul", ["ln", "mask3"], ["masked"]),
            helper.make_node("ReduceSum", ["masked", "axes"], ["summed"], keepdims=0),
            helper.make_node("ReduceSum", ["mask3", "axes"], ["count"], keepdims=0),
            helper.make_node("Div", ["summed", "count"], ["cls"]),
        ],
    }


POOLERS = poolers()


def tiny_graph(path, bias_shape: tuple[int, ...], pool: str = "first"):
    """Embeddings -> fused Attention -> residual Add -> Add of a constant of `bias_shape` -> LayerNorm -> the first
    token (`pool`: "first"; "mean": the mean over positions) -> a classifier: the shape of a BERT layer, small
    enough to read."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    hidden, vocab = 8, 20
    weights = {
        "E": rng.normal(size=(vocab, hidden)), "W": rng.normal(size=(hidden, 3 * hidden)) / 3,
        "b": rng.normal(size=3 * hidden), "C": rng.normal(size=bias_shape), "g": np.ones(hidden),
        "beta": np.zeros(hidden), "Wc": rng.normal(size=(hidden, 2)),
    }  # fmt: skip
    inits = [numpy_helper.from_array(v.astype(np.float32), k) for k, v in weights.items()]
    inits += [numpy_helper.from_array(np.array([1], np.int64), "axes"), numpy_helper.from_array(np.array(0), "first")]
    nodes = [
        helper.make_node("Gather", ["E", "input_ids"], ["emb"]),
        helper.make_node("Cast", ["attention_mask"], ["mask32"], to=TensorProto.INT32),
        helper.make_node("ReduceSum", ["mask32", "axes"], ["lengths"], keepdims=0),
        helper.make_node("Attention", ["emb", "W", "b", "lengths"], ["att"], domain="com.microsoft", num_heads=2),
        helper.make_node("Add", ["att", "emb"], ["res"]),
        helper.make_node("Add", ["res", "C"], ["shifted"]),
        helper.make_node("LayerNormalization", ["shifted", "g", "beta"], ["ln"], axis=-1),
        *POOLERS[pool],
        helper.make_node("MatMul", ["cls", "Wc"], ["logits"]),
    ]
    if pool == "masked_mean":
        inits.append(numpy_helper.from_array(np.array([2], np.int64), "last"))
    ids = [helper.make_tensor_value_info(n, TensorProto.INT64, ["b", "s"]) for n in ("input_ids", "attention_mask")]
    out = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["b", 2])]
    opsets = [helper.make_opsetid("", 18), helper.make_opsetid("com.microsoft", 1)]
    onnx.save(helper.make_model(helper.make_graph(nodes, "tiny", ids, out, inits), opset_imports=opsets), path)
    return path


def run_graph(path, ids, mask):
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {"input_ids": ids, "attention_mask": mask})[0]


def test_rewrite_packs_a_residual_from_before_attention_and_refuses_an_operand_that_would_broadcast_wrong(tmp_path):
    ids = np.array([[1, 5, 7, 2, 0], [1, 9, 2, 0, 0], [1, 3, 4, 6, 2]], dtype=np.int64)
    mask = (ids > 0).astype(np.int64)
    path = tiny_graph(tmp_path / "bias.onnx", (8,))
    before = run_graph(path, ids, mask)

    info = pack_tokens(path)

    assert info["applied"] and info["attention"] == 1 and info["tokenwise"] == 3, info  # two Adds, LayerNorm
    np.testing.assert_allclose(run_graph(path, ids, mask), before, atol=1e-5)
    np.testing.assert_allclose(run_graph(path, ids[:1], mask[:1]), before[:1], atol=1e-5)  # unpadded: plain branch

    # A per-position constant ([1, seq, hidden]-like) would meet [tokens, hidden] rows it was not made for.
    wrong = tiny_graph(tmp_path / "position.onnx", (1, 1, 8))
    original = wrong.read_bytes()
    info = pack_tokens(wrong)
    assert not info["applied"] and "reads C (1, 1, 8)" in info["reason"], info
    assert wrong.read_bytes() == original


def test_pooled_tail_runs_the_last_layer_on_the_pooled_token_and_answers_as_before(graphs, tmp_path):
    folder = shutil.copytree(graphs / "export", tmp_path / "export")
    info = pooled_tail(onnx_file(folder))

    # The last layer after its attention: output projection (MatMul, Add), residual Add, LayerNorm, FFN in
    # (MatMul, Add), GELU (Div, Erf, Add, Mul, Mul), FFN out (MatMul, Add), residual Add, LayerNorm.
    assert info["applied"] is True and info["tail_ops"] == 15, info
    assert len(info["taken_at"]) == 2  # the attention's output and the residual that meets it
    before = load_model(graphs / "export", "onnx", 16, 1, "cpu")
    after = load_model(folder, "onnx", 16, 1, "cpu")
    np.testing.assert_allclose(after.run(after.tokenizer(TEXTS)), before.run(before.tokenizer(TEXTS)), atol=1e-5)
    np.testing.assert_allclose(after.logits_batched(TEXTS, 1), before.logits_batched(TEXTS, 1), atol=1e-5)
    assert pooled_tail(onnx_file(folder)) == {"applied": False, "reason": "the graph's tail is cut already"}
    assert pooled_tail(onnx_file(graphs / "quantize"))["reason"].startswith("the graph is token-packed")


def test_pooled_tail_leaves_a_graph_without_a_single_pooled_position(tmp_path):
    ids = np.array([[1, 5, 7, 2, 0], [1, 9, 2, 0, 0]], dtype=np.int64)
    mask = (ids > 0).astype(np.int64)
    mean = tiny_graph(tmp_path / "mean.onnx", (8,), pool="mean")
    original = mean.read_bytes()
    assert pooled_tail(mean) == {"applied": False, "reason": "0 reads of one position of the hidden states "
                                 "(hidden[:, k]), not 1"}  # fmt: skip
    assert mean.read_bytes() == original

    first = tiny_graph(tmp_path / "first.onnx", (8,))
    before = run_graph(first, ids, mask)
    info = pooled_tail(first)
    assert info["applied"] and info["tail_ops"] == 3 and info["taken_at"] == ["att", "emb"], info
    np.testing.assert_allclose(run_graph(first, ids, mask), before, atol=1e-6)
    # The only attention's output is now read at one position: packing has nothing left to do.
    assert pack_tokens(first)["reason"].startswith("every attention output is read at one position only")


def test_optimize_records_the_pooled_tail_and_can_leave_it_out(graphs, tmp_path):
    from toolkit.config import OptimizeConfig
    from toolkit.stages import optimize
    from toolkit.stages.base import Artifact, StageContext

    source = Artifact(graphs / "export", "onnx", "export")
    results = {}
    for cut in (True, False):
        out = tmp_path / f"o{cut}"
        out.mkdir()
        ctx = StageContext(run_dir=tmp_path, out_dir=out, source=source)
        results[cut] = optimize.run(OptimizeConfig(type="optimize", pooled_tail=cut), ctx)
    assert results[True].info["pooled_tail"]["applied"] is True
    assert results[False].info["pooled_tail"] == {"applied": False, "reason": "off"}
    assert results[True].info["fused_ops"] == results[False].info["fused_ops"]  # fused first, then cut
    cut, whole = (load_model(results[k].artifact.path, "onnx", 16, 1, "cpu") for k in (True, False))
    np.testing.assert_allclose(cut.logits(TEXTS), whole.logits(TEXTS), atol=1e-5)


def test_packing_refuses_a_pooler_that_reads_every_token(tmp_path):
    """A masked mean over the tokens would read the copies packing leaves where the padding was."""
    ids = np.array([[1, 5, 7, 2, 0], [1, 9, 2, 0, 0], [1, 3, 4, 6, 2]], dtype=np.int64)
    mask = (ids > 0).astype(np.int64)
    path = tiny_graph(tmp_path / "masked_mean.onnx", (8,), pool="masked_mean")
    original = path.read_bytes()
    info = pack_tokens(path)
    assert not info["applied"] and "ReduceSum" in info["reason"] and "copies" in info["reason"], info
    assert path.read_bytes() == original
    assert np.isfinite(run_graph(path, ids, mask)).all()


def test_a_packed_branch_that_answers_otherwise_is_refused(graphs, tmp_path, monkeypatch):
    """Judged by its numbers: a packed branch whose pooler reads the wrong token has the right shapes."""
    import toolkit.stages.packing as packing

    def wrong_token(self, position):
        from onnx import numpy_helper

        self.graph.initializer.append(numpy_helper.from_array(np.array(1, dtype=np.int64), "pack/wrong"))
        return self.add("Gather", ["pack/row_of", "pack/wrong"], "pack/rows_at_wrong", axis=1)

    folder = shutil.copytree(graphs / "optimize", tmp_path / "corrupt")
    original = onnx_file(folder).read_bytes()
    monkeypatch.setattr(packing.Packer, "rows_at", wrong_token)
    info = pack_tokens(onnx_file(folder))
    assert not info["applied"] and info["reason"].startswith("the packed graph answers padded texts"), info
    assert onnx_file(folder).read_bytes() == original
    monkeypatch.undo()
    info = pack_tokens(onnx_file(folder))
    assert info["applied"] and info["probe_max_difference"] <= info["probe_allowed"] == 1e-4, info


def test_rewrites_leave_a_graph_whole_when_onnx_runtime_cannot_run_it(tmp_path):
    """NotImplemented (a kernel the CPU provider lacks, as FP16 attention on an old ONNX Runtime) is a refusal."""
    from onnx import TensorProto, helper

    for rewrite in (pack_tokens, pooled_tail):
        path = tiny_graph(tmp_path / f"{rewrite.__name__}.onnx", (8,))
        model = onnx.load(str(path))
        model.graph.node[-1].output[0] = "raw"
        model.graph.node.extend([
            helper.make_node("Cast", ["raw"], ["half"], to=TensorProto.BFLOAT16),
            helper.make_node("Tanh", ["half"], ["squashed"]),  # no bfloat16 Tanh on the CPU provider
            helper.make_node("Cast", ["squashed"], ["logits"], to=TensorProto.FLOAT),
        ])  # fmt: skip
        onnx.save(model, str(path))
        original = path.read_bytes()
        info = rewrite(path)
        assert not info["applied"] and info["reason"].startswith("NotImplemented"), info
        assert path.read_bytes() == original
