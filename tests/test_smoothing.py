"""SmoothQuant before INT8: the rewritten FP32 graph answers as before, one factor per activation (Q, K and V of
an unfused graph share one), and the options that need each other are checked before any work."""

from __future__ import annotations

import shutil

import numpy as np
import onnx
import pytest

from toolkit.runtime import Tokenizer, load_model, onnx_file
from toolkit.stages.base import Artifact
from toolkit.stages.smoothing import smooth, smoothable

TEXTS = ["the movie was good", "awful plot and it was dull", "a story", "brilliant actor, very lovely film"]


@pytest.mark.parametrize(("stage", "activations", "nodes", "folded"), [("export", 8, 12, 0), ("optimize", 8, 8, 2)])
def test_smoothing_keeps_the_fp32_answers(graphs, tmp_path, stage, activations, nodes, folded):
    folder = shutil.copytree(graphs / stage, tmp_path / stage)
    before = load_model(folder, "onnx", 16, 1, "cpu").logits(TEXTS)
    path = onnx_file(folder)
    # A layer: attention input (Q, K, V as three MatMuls unfused, one Attention fused), attention output, FFN in/out.
    assert sum(len(n) for n in smoothable(onnx.load(str(path)).graph).values()) == nodes

    info = smooth(path, [Tokenizer(folder, 16)(TEXTS)], alpha=0.9)

    assert (info["activations"], info["nodes"], info["folded_into_attention"]) == (activations, nodes, folded)
    assert info["largest_factor_spread"] > 1.0  # the factors differ by channel: something was moved
    graph = onnx.load(str(path)).graph
    # A fused Attention's output is rescaled through its value columns, without a Mul.
    assert sum(n.op_type == "Mul" and n.name.endswith("/smooth") for n in graph.node) == activations - folded
    after = load_model(folder, "onnx", 16, 1, "cpu").logits(TEXTS)
    np.testing.assert_allclose(after, before, atol=1e-4)


def test_quantize_records_smoothing_and_int8_embedding_rows(tiny_model, tmp_path, toy_recipe, write_recipe):
    from typer.testing import CliRunner

    from toolkit.cli import app
    from toolkit.manifest import Manifest

    recipe = {**toy_recipe, "stages": [*toy_recipe["stages"], {"type": "export"}, {"type": "optimize"},
                                       {"type": "quantize", "calibration_samples": 16}]}  # fmt: skip
    path = write_recipe(recipe)
    result = CliRunner().invoke(app, ["run", str(path)])
    assert result.exit_code == 0, result.output
    entry = Manifest.load(path.parent / "run").stage("quantize")
    assert entry["info"]["smooth_quant"]["alpha"] == 0.9 and entry["info"]["smooth_quant"]["activations"] == 8
    assert entry["info"]["per_channel"] is True and "Gather" not in entry["info"]["quantized_ops"]
    assert entry["info"]["embeddings"] == "int8_rows" and "int8_embedding_rows" in entry["info"]
    assert Artifact.from_json(entry["output"]).format == "onnx"


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"per_channel": False}, "smooth_quant needs per_channel: true"),
        (
            {"smooth_quant": None, "activation_scales": "per_token", "calibration_samples": 10},
            "calibration_samples only applies with mode: static, smooth_quant or activation_scales: calibrated",
        ),
        ({"smooth_quant": 1.5}, "smooth_quant"),
    ],
)
def test_smoothing_options_are_checked_before_any_work(toy_recipe, write_recipe, options, message):
    from toolkit.recipe import RecipeError, load_recipe

    recipe = {**toy_recipe, "stages": [*toy_recipe["stages"], {"type": "export"}, {"type": "quantize", **options}]}
    with pytest.raises(RecipeError, match=message):
        load_recipe(write_recipe(recipe))


def test_int8_embedding_rows_answer_as_fp32_tables(graphs, tmp_path):
    from toolkit.stages.quantize import int8_embedding_rows

    folder = shutil.copytree(graphs / "optimize", tmp_path / "rows")
    before = load_model(folder, "onnx", 16, 1, "cpu").logits(TEXTS)
    size = onnx_file(folder).stat().st_size

    assert int8_embedding_rows(onnx_file(folder)) == []  # every table of the tiny model is under 1 MiB
    tables = int8_embedding_rows(onnx_file(folder), min_bytes=0)

    assert len(tables) == 3, tables  # words, positions, token types
    graph = onnx.load(str(onnx_file(folder))).graph
    assert {t.data_type for t in graph.initializer if t.name.endswith("/int8")} == {onnx.TensorProto.INT8}
    assert onnx_file(folder).stat().st_size < size
    after = load_model(folder, "onnx", 16, 1, "cpu").logits(TEXTS)
    assert (after.argmax(-1) == before.argmax(-1)).all()
    np.testing.assert_allclose(after, before, atol=0.02)


def test_quantize_without_data_says_what_to_change(graphs, tmp_path):
    from toolkit.config import QuantizeConfig
    from toolkit.stages import quantize
    from toolkit.stages.base import StageContext

    source = Artifact(graphs / "optimize", "onnx", "optimize")
    ctx = StageContext(run_dir=tmp_path, out_dir=tmp_path / "q", source=source, max_length=16)
    (tmp_path / "q").mkdir()
    with pytest.raises(ValueError, match="set smooth_quant: null with mode: dynamic"):
        quantize.run(QuantizeConfig(type="quantize"), ctx)
