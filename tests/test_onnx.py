"""ONNX stages on the tiny BERT through the real pipeline and ONNX Runtime: export (pruned too), fusion, INT8 on
the fused graph, the parity gate, and the onnx predictor against PyTorch."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from toolkit.cli import app
from toolkit.runtime import load_model, onnx_file
from toolkit.stages import REGISTRY, Artifact, Stage, StageContext
from toolkit.stages import export as export_stage
from toolkit.stages import optimize as optimize_stage
from toolkit.stages import quantize as quantize_stage

ONNX_STAGES = [
    {"type": "export"},
    {"type": "optimize", "level": "O2"},
    {"type": "quantize", "instruction_set": "avx2"},
]
TEXTS = ["the movie was good", "awful plot and it was dull", "a story", "brilliant actor, very lovely film"]


def onnx_recipe(toy_recipe: dict, **select) -> dict:
    recipe = {**toy_recipe, "stages": [*toy_recipe["stages"], *ONNX_STAGES]}
    if select:
        recipe["select"] = select
    return recipe


def run_cli(recipe_path: Path):
    result = CliRunner().invoke(app, ["run", str(recipe_path)])
    return result, json.loads((recipe_path.parent / "run" / "manifest.json").read_text())


def test_full_onnx_chain_fuses_quantizes_selects_and_reports(toy_recipe, write_recipe):
    result, manifest = run_cli(write_recipe(onnx_recipe(toy_recipe)))
    assert result.exit_code == 0, result.output
    stages = manifest["stages"]
    assert [stages[s]["status"] for s in ("train", "export", "optimize", "quantize")] == ["done"] * 4
    assert stages["export"]["evaluation"]["parity"]["agreement"] == 1.0
    assert stages["export"]["evaluation"]["parity"]["max_abs_diff"] < 1e-3
    for name in ("export", "optimize", "quantize"):
        assert stages[name]["gate"]["passed"], stages[name]["gate"]
    assert stages["export"]["input"]["stage"] == "train"
    assert stages["quantize"]["input"]["stage"] == "optimize"
    fused = stages["optimize"]["info"]["fused_ops"]
    assert fused.get("Attention") == 2 and fused.get("BiasGelu") == 2, fused
    # On the CPU the residual Add + LayerNorm stay unfused: ORT's CPU SkipLayerNormalization kernel is slower.
    assert "SkipLayerNormalization" not in fused and stages["optimize"]["info"]["skip_layer_norm_fused"] is False
    # INT8 on the fused graph, attention quantized in place, with activation scales calibrated on the training
    # texts: fixed, so every answer is independent of its call.
    info = stages["quantize"]["info"]
    assert info["fused_ops"].get("QAttention") == 2 and "DynamicQuantizeLinear" not in info["fused_ops"], info
    assert info["token_scales"]["applied"] and info["batch_invariant"] is True, info["token_scales"]
    assert info["activation_scales"] == "calibrated" and info["token_scales"]["calibration_tokens"] > 100
    assert stages["quantize"]["info"]["instruction_set"] == "avx2"
    assert manifest["selection"]["stage"] in stages
    assert set(manifest["selection"]["candidates"]) == {"train", "export", "optimize", "quantize"}

    from optimum.onnxruntime import ORTModelForSequenceClassification

    model = ORTModelForSequenceClassification.from_pretrained(Path(stages["quantize"]["output"]["path"]))
    assert model.config.id2label == {0: "negative", 1: "positive"}

    run_dir = Path(stages["train"]["output"]["path"]).parent
    report = (run_dir / "report.md").read_text()
    for name in ("train", "export", "optimize", "quantize"):
        assert f"| {name} |" in report
    assert "data:image/png;base64," in (run_dir / "report.html").read_text()
    assert (run_dir / "accuracy_vs_latency.png").stat().st_size > 1000
    assert "speed-up" in result.output and "Selected:" in result.output


def corrupt_logits_layer(folder: Path) -> None:
    """Negate the weights of the node that writes the logits: predictions flip, the graph still runs."""
    import onnx
    from onnx import numpy_helper

    path = onnx_file(folder)
    model = onnx.load(str(path))
    last = next(n for n in model.graph.node if "logits" in n.output)
    inits = {t.name: t for t in model.graph.initializer}
    for name in last.input:
        if name in inits:
            inits[name].CopyFrom(numpy_helper.from_array(-numpy_helper.to_array(inits[name]), name))
    onnx.save(model, str(path))


def break_stage(monkeypatch, kind: str) -> None:
    """Make a real stage write a model whose logits layer is corrupted."""
    real = REGISTRY[kind]

    def broken(cfg, ctx):
        result = real.run(cfg, ctx)
        corrupt_logits_layer(ctx.out_dir)
        return result

    monkeypatch.setitem(REGISTRY, kind, Stage(real.config, broken))


def test_broken_optimize_fails_its_gate_and_quantize_starts_from_export(toy_recipe, write_recipe, monkeypatch):
    break_stage(monkeypatch, "optimize")
    result, manifest = run_cli(write_recipe(onnx_recipe(toy_recipe)))
    assert result.exit_code == 0, result.output
    optimize = manifest["stages"]["optimize"]
    assert optimize["status"] == "failed_gate"
    assert optimize["gate"]["passed"] is False
    assert optimize["evaluation"]["parity"]["agreement"] < 0.5
    assert "optimize: FAILED its parity gate" in result.output
    quantize = manifest["stages"]["quantize"]
    assert quantize["input"]["stage"] == "export"
    assert quantize["status"] == "done"
    assert manifest["selection"]["stage"] != "optimize"
    assert "status failed_gate" in manifest["selection"]["candidates"]["optimize"]["lost"]


def test_failed_export_skips_onnx_stages_and_keeps_fine_tuned_model(toy_recipe, write_recipe, monkeypatch):
    break_stage(monkeypatch, "export")
    result, manifest = run_cli(write_recipe(onnx_recipe(toy_recipe)))
    assert result.exit_code == 0, result.output
    assert manifest["stages"]["export"]["status"] == "failed_gate"
    assert manifest["stages"]["optimize"]["status"] == "skipped"
    assert manifest["stages"]["quantize"]["status"] == "skipped"
    assert manifest["selection"]["stage"] == "train"


def prune(tiny_model: Path, folder: Path) -> Path:
    """Different head counts per layer (config.pruned_heads) and an FFN sliced to a smaller width."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_model, num_labels=3)
    model.prune_heads({0: [0, 1], 1: [2]})
    keep = 40
    for layer in model.bert.encoder.layer:
        up, down = layer.intermediate.dense, layer.output.dense
        new_up, new_down = torch.nn.Linear(up.in_features, keep), torch.nn.Linear(keep, down.out_features)
        with torch.no_grad():
            new_up.weight.copy_(up.weight[:keep]), new_up.bias.copy_(up.bias[:keep])
            new_down.weight.copy_(down.weight[:, :keep]), new_down.bias.copy_(down.bias)
        layer.intermediate.dense, layer.output.dense = new_up, new_down
    model.config.intermediate_size = keep
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(tiny_model).save_pretrained(folder)
    reloaded = AutoModelForSequenceClassification.from_pretrained(folder)
    assert reloaded.config.pruned_heads == {"0": [0, 1], "1": [2]} or reloaded.config.pruned_heads == {
        0: [0, 1],
        1: [2],
    }
    return folder


def stage_ctx(tmp_path: Path, name: str, source: Artifact, artifacts: dict) -> StageContext:
    out = tmp_path / name
    out.mkdir()
    return StageContext(run_dir=tmp_path, out_dir=out, source=source, artifacts=dict(artifacts), device="cpu")


def test_pruned_model_exports_fuses_and_quantizes_with_matching_logits(tiny_model, tmp_path):
    pruned = Artifact(prune(tiny_model, tmp_path / "pruned"), "pytorch", "prune")
    exported = export_stage.run(export_stage.ExportConfig(type="export"), stage_ctx(tmp_path, "e", pruned, {}))
    assert exported.info["heads_per_layer"] == [2, 3] and exported.info["intermediate_size"] == 40
    reference = load_model(pruned.path, "pytorch", 16, 1, "cpu").logits(TEXTS)
    onnx_logits = load_model(exported.artifact.path, "onnx", 16, 1, "cpu").logits(TEXTS)
    np.testing.assert_allclose(onnx_logits, reference, atol=1e-4)

    arts = {"prune": pruned, "e": exported.artifact}
    optimized = optimize_stage.run(
        optimize_stage.OptimizeConfig(type="optimize", level="O3", fuse_skip_layer_norm=True),
        stage_ctx(tmp_path, "o", exported.artifact, arts),
    )
    assert optimized.info["fused_ops"].get("Attention") == 2 and optimized.info["fp16"] is False
    assert optimized.info["fused_ops"].get("SkipLayerNormalization", 0) >= 2  # asked for, so fused on the CPU too
    assert "FastGelu" in optimized.info["fused_ops"] or "BiasGelu" in optimized.info["fused_ops"]
    np.testing.assert_allclose(
        load_model(optimized.artifact.path, "onnx", 16, 1, "cpu").logits(TEXTS), reference, atol=1e-3
    )

    arts["o"] = optimized.artifact
    quantized = quantize_stage.run(
        quantize_stage.QuantizeConfig(type="quantize", smooth_quant=None, activation_scales="per_token"),
        stage_ctx(tmp_path, "q", optimized.artifact, arts),
    )
    assert quantized.info["per_channel"] is True
    assert sorted(p.name for p in Path(quantized.artifact.path).glob("*.onnx")) == ["model.onnx"]
    q_logits = load_model(quantized.artifact.path, "onnx", 16, 1, "cpu").logits(TEXTS)
    assert q_logits.shape == reference.shape and np.isfinite(q_logits).all()

    # An export after an ONNX stage reads the newest PyTorch model.
    again = export_stage.run(
        export_stage.ExportConfig(type="export"), stage_ctx(tmp_path, "e2", quantized.artifact, arts)
    )
    assert again.source == pruned and again.info["source"] == "prune"


def test_detect_instruction_set_reads_cpu_flags(tmp_path):
    detect = quantize_stage.detect_instruction_set
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor : 0\nflags : fpu sse2 avx2 avx512f avx512bw avx512_vnni\n")
    assert detect(cpuinfo, "x86_64")[0] == "avx512_vnni"
    cpuinfo.write_text("flags : fpu sse2 avx2 avx512f avx512bw\n")
    assert detect(cpuinfo, "x86_64")[0] == "avx512"
    cpuinfo.write_text("flags : fpu sse2 avx2\n")
    assert detect(cpuinfo, "x86_64")[0] == "avx2"
    assert detect(cpuinfo, "aarch64")[0] == "arm64"
    cpuinfo.write_text("flags : fpu sse2\n")
    with pytest.raises(ValueError, match="instruction_set"):
        detect(cpuinfo, "x86_64")


@pytest.mark.parametrize(
    ("stages", "message"),
    [
        ([{"type": "optimize"}], "put an enabled `export` stage before it"),
        ([{"type": "export"}, {"type": "optimize", "level": "O4"}], "'O1', 'O2' or 'O3'"),
        ([{"type": "export"}, {"type": "quantize", "instruction_set": "sse"}], "avx512_vnni"),
        ([{"type": "export", "parity": {"min_agreement": 1.5}}], "stages[1].parity.min_agreement"),
    ],
)
def test_invalid_onnx_options_fail_validation(toy_recipe, write_recipe, stages, message):
    recipe = {**toy_recipe, "stages": [*toy_recipe["stages"], *stages]}
    result = CliRunner().invoke(app, ["validate", str(write_recipe(recipe))])
    assert result.exit_code == 1
    assert message in result.output


def test_int8_from_pytorch_runs_the_stages_outside_a_run(tiny_model, tmp_path):
    from toolkit.stages.chain import int8_from_pytorch
    from toolkit.stages.onnx_common import op_counts

    folder = int8_from_pytorch(tiny_model, tmp_path / "work")
    assert folder == tmp_path / "work" / "quantize"
    ops = op_counts(onnx_file(folder))
    assert ops.get("MultiHeadAttention") == 2 and "SkipLayerNormalization" not in ops, ops
    reference = load_model(tiny_model, "pytorch", 16, 1, "cpu").logits(TEXTS)
    np.testing.assert_allclose(load_model(folder, "onnx", 16, 1, "cpu").logits(TEXTS), reference, atol=0.1)


@pytest.mark.slow
def test_static_int8_calibrates_on_training_texts_and_answers_independently_of_the_call(toy_recipe, write_recipe):
    import numpy as np

    recipe = onnx_recipe(toy_recipe)
    recipe["stages"][-1] = {"type": "quantize", "instruction_set": "avx2", "mode": "static", "calibration_samples": 64}
    result, manifest = run_cli(write_recipe(recipe))
    assert result.exit_code == 0, result.output
    entry = manifest["stages"]["quantize"]
    assert entry["status"] == "done" and entry["gate"]["passed"], entry.get("gate")
    assert entry["info"]["mode"] == "static" and entry["info"]["calibration"]["texts"] == 64
    assert entry["info"]["op_counts"].get("QLinearMatMul", 0) > 0  # static operators, not MatMulInteger
    model = load_model(entry["output"]["path"], "onnx", 16, 1, "cpu")
    alone = np.concatenate([model.logits([t]) for t in TEXTS])
    np.testing.assert_allclose(model.logits(TEXTS), alone, atol=1e-5)  # fixed scales: the call does not matter


def test_calibration_options_need_static_mode(toy_recipe, write_recipe):
    from toolkit.recipe import RecipeError, load_recipe

    recipe = onnx_recipe(toy_recipe)
    recipe["stages"][-1] = {"type": "quantize", "calibration_method": "entropy"}
    with pytest.raises(RecipeError, match=r"calibration_method only applies with mode: static"):
        load_recipe(write_recipe(recipe))


def test_quantize_preprocesses_with_onnxruntimes_quant_pre_process(tiny_model, tmp_path):
    """The graph the quantizer reads is `quant_pre_process`'s: every intermediate tensor typed, nothing re-fused."""
    import onnx

    from toolkit.stages.chain import int8_from_pytorch
    from toolkit.stages.quantize import shape_inferred_copy

    work = tmp_path / "chain"
    int8_from_pytorch(tiny_model, work)
    optimized = onnx.load(str(onnx_file(work / "optimize")))
    inferred = onnx.load(str(shape_inferred_copy(work / "optimize", tmp_path / "pre")))
    assert len(inferred.graph.value_info) > len(optimized.graph.value_info)
    typed = {v.name for v in inferred.graph.value_info}
    assert all(out in typed for node in inferred.graph.node for out in node.output if node.op_type == "Attention")
    assert [n.op_type for n in inferred.graph.node] == [n.op_type for n in optimized.graph.node]
    assert (tmp_path / "pre" / "tokenizer.json").is_file()
