"""The optional OpenVINO backend: an ONNX stage's graph to IR (FP32 and NNCF INT8), evaluated, gated, selectable and
run by the same runtime as every other model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from test_onnx import ONNX_STAGES, TEXTS, run_cli

from toolkit.recipe import RecipeError, load_recipe
from toolkit.runtime import load_model

pytest.importorskip("openvino")
pytest.importorskip("nncf")


def openvino_recipe(toy_recipe: dict, *openvino_stages: dict) -> dict:
    return {**toy_recipe, "stages": [*toy_recipe["stages"], *ONNX_STAGES, *openvino_stages]}


def test_ir_stages_convert_quantize_and_are_judged_like_every_stage(toy_recipe, write_recipe):
    stages = ({"type": "openvino", "name": "ov_fp32", "quantize": "none"},
              {"type": "openvino", "name": "ov_int8", "source": "optimize", "calibration_samples": 64})  # fmt: skip
    result, manifest = run_cli(write_recipe(openvino_recipe(toy_recipe, *stages)))
    assert result.exit_code == 0, result.output
    fp32, int8 = manifest["stages"]["ov_fp32"], manifest["stages"]["ov_int8"]
    # parity is against the ONNX graph each one converted, not the stage before it in the recipe
    assert fp32["input"]["stage"] == "export" and int8["input"]["stage"] == "optimize"
    assert fp32["evaluation"]["parity"]["agreement"] == 1.0
    assert fp32["evaluation"]["parity"]["max_abs_diff"] < 1e-3  # f32 inference precision, not the CPU's bf16
    assert int8["gate"]["passed"], int8["gate"]
    assert int8["info"]["calibration"]["texts"] == 64 and int8["info"]["source"] == "optimize"
    # the IR of `export` runs the last layer's tail on the pooled token; `optimize`'s graph was cut already
    assert fp32["info"]["pooled_tail"]["applied"] is True
    assert int8["info"]["pooled_tail"]["reason"] == "the graph's tail is cut already"
    assert {"ov_fp32", "ov_int8"} <= set(manifest["selection"]["candidates"])
    for entry in (fp32, int8):
        folder = Path(entry["output"]["path"])
        assert entry["output"]["format"] == "openvino"
        assert (folder / "openvino_model.xml").is_file() and (folder / "openvino_model.bin").is_file()
        assert not list(folder.glob("*.onnx")) and (folder / "tokenizer.json").is_file()
    assert "| ov_int8 |" in (Path(fp32["output"]["path"]).parent / "report.md").read_text()

    export = load_model(manifest["stages"]["export"]["output"]["path"], "onnx", 16, 1, "cpu")
    ir = load_model(fp32["output"]["path"], "openvino", 16, 1, "cpu")
    np.testing.assert_allclose(ir.logits(TEXTS), export.logits(TEXTS), atol=1e-4)
    assert ir.device == "cpu" and ir.num_parameters > 0
    push_layout_of_an_ir_selection(Path(fp32["output"]["path"]).parent, int8)
    quantized = load_model(int8["output"]["path"], "openvino", 16, 1, "cpu")
    alone = np.concatenate([quantized.logits([t]) for t in TEXTS])
    np.testing.assert_allclose(quantized.logits(TEXTS), alone, atol=1e-4)  # static scales: the call does not matter


@pytest.mark.slow
def test_accuracy_control_keeps_validation_accuracy(toy_recipe, write_recipe):
    stage = {"type": "openvino", "quantize": "int8_accuracy_control", "calibration_samples": 64,
             "validation_samples": 32, "max_accuracy_drop": 0.02}  # fmt: skip
    result, manifest = run_cli(write_recipe(openvino_recipe(toy_recipe, stage)))
    assert result.exit_code == 0, result.output
    entry = manifest["stages"]["openvino"]
    assert entry["status"] == "done" and entry["info"]["validation_texts"] == 32
    assert entry["evaluation"]["accuracy"] >= manifest["stages"]["export"]["evaluation"]["accuracy"] - 0.05


@pytest.mark.parametrize(
    ("stages", "message"),
    [
        ([{"type": "openvino", "source": "train"}], r"source 'train' is not an earlier enabled export or optimize"),
        ([{"type": "openvino", "source": "nosuch"}], r"source 'nosuch' is not an earlier enabled export"),
        ([{"type": "openvino", "quantize": "int4"}], r"quantize.*'none', 'int8' or 'int8_accuracy_control'"),
    ],
)
def test_invalid_openvino_options_fail_validation(toy_recipe, write_recipe, stages, message):
    with pytest.raises(RecipeError, match=message):
        load_recipe(write_recipe(openvino_recipe(toy_recipe, *stages)))


def test_missing_extra_is_said_before_any_work(toy_recipe, write_recipe, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "nncf" else real(name, *a))
    with pytest.raises(RecipeError, match=r"needs nncf, not installed here: pip install -e '\.\[openvino\]'"):
        load_recipe(write_recipe(openvino_recipe(toy_recipe, {"type": "openvino"})))
    load_recipe(write_recipe(openvino_recipe(toy_recipe, {"type": "openvino", "quantize": "none"})))


@pytest.mark.slow
def test_bentoml_serve_answers_with_an_openvino_model(tiny_model, tmp_path):
    """A packaged IR is served by the same service and runtime: the answers are the ONNX graph's."""
    import openvino as ov
    from test_serve import LABELS, LIMITS, MAX_LENGTH, classifier_folder, onnx_folder, post, reference
    from test_serve import TEXTS as SERVED_TEXTS

    from toolkit.serving.launch import serving
    from toolkit.stages.base import Artifact
    from toolkit.stages.package import save_to_store

    onnx = onnx_folder(classifier_folder(tiny_model, tmp_path / "pt"), tmp_path / "onnx")
    ir = tmp_path / "ir"
    ir.mkdir()
    ov.save_model(ov.convert_model(str(onnx / "model.onnx")), str(ir / "openvino_model.xml"), compress_to_fp16=False)
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt"):
        (ir / name).write_bytes((onnx / name).read_bytes())
    meta = {"format": "openvino", "stage": "openvino", "labels": LABELS, "max_length": MAX_LENGTH, "recipe": "toy"}
    save_to_store("toy-ov", Artifact(ir, "openvino", "openvino"), meta)
    expected_ids, expected_probs = reference(onnx, SERVED_TEXTS)
    with serving({**LIMITS, "TOOLKIT_MODEL": "toy-ov"}, log=tmp_path / "serve.log") as url:
        response = post(url, "classify_batch", {"text": SERVED_TEXTS})
        assert response.status_code == 200, response.text
        assert response.json()["categories"] == expected_ids
        assert response.json()["probabilities"] == pytest.approx(expected_probs, abs=1e-4)
        single = post(url, "classify", {"text": SERVED_TEXTS[0]})
        assert single.status_code == 200 and single.json()["categories"] == expected_ids[0], single.text


def push_layout_of_an_ir_selection(run_dir: Path, entry: dict) -> None:
    """Selected, an IR goes to the Hub beside its ancestors: PyTorch at the root, ONNX under onnx/, IR under
    openvino/."""
    from toolkit.hub import plan_upload
    from toolkit.manifest import Manifest

    manifest = Manifest.load(run_dir)
    manifest.data["selection"] = {**manifest.selection, "stage": "ov_int8", "artifact": entry["output"]}
    upload = plan_upload(manifest, "user/toy")
    names = {name for name, _ in upload.files}
    assert {"model.safetensors", "config.json", "onnx/model_optimized.onnx", "onnx/model.onnx"} <= names
    assert {"openvino/openvino_model.xml", "openvino/openvino_model.bin", "openvino/tokenizer.json"} <= names
    assert "- openvino" in upload.card and "- int8" in upload.card and 'subfolder="openvino"' in upload.card
