"""Compatibility tested, not assumed: a head-pruned run's pushed repo (`toolkit push --local-dir`) loads in
stock transformers 5 (a side venv, `.venv-tf5`) with toolkit's PyTorch logits, and transformers.js classifies
its ONNX graphs as toolkit does (q8: `toolkit predict` on the INT8 selection; fp32: the export graph). The side
venv and tests/js/node_modules are made on the first run and reused."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from compat import (
    JS_DIR,
    TEXTS,
    figures,
    table,
    toolkit_answers,
    toolkit_predict,
    transformers5_logits,
    transformers_js_classes,
)
from conftest import build_tiny_model, toy_examples
from typer.testing import CliRunner

from toolkit.cli import app
from toolkit.hub import TESTED_TRANSFORMERS_5, TESTED_TRANSFORMERS_JS
from toolkit.manifest import Manifest
from toolkit.pipeline import run_recipe
from toolkit.recipe import load_recipe


def test_package_json_pins_the_tested_transformers_js():
    package = json.loads((JS_DIR / "package.json").read_text())
    assert package["dependencies"] == {"@huggingface/transformers": TESTED_TRANSFORMERS_JS}
    lock = json.loads((JS_DIR / "package-lock.json").read_text())
    assert lock["packages"]["node_modules/@huggingface/transformers"]["version"] == TESTED_TRANSFORMERS_JS


@pytest.fixture(scope="module")
def wider_model(tmp_path_factory):
    """The tiny model 64 wide: at 32 its INT8 graph is no smaller than the FP32 one (per-node overhead), and
    the selection below picks the smallest."""
    return build_tiny_model(tmp_path_factory.mktemp("bert-64"), [text for text, _ in toy_examples(400)], hidden=64)


@pytest.mark.slow
def test_pushed_pruned_int8_repo_answers_as_toolkit_in_transformers_5_and_transformers_js(
    toy_recipe, wider_model, write_recipe, tmp_path
):
    recipe = {
        **toy_recipe,
        "model": {**toy_recipe["model"], "name": str(wider_model)},
        "stages": [
            *toy_recipe["stages"],
            # 2 of 4 heads and 48 of 128 FFN neurons kept, then recovered: confident answers, no near-ties
            {
                "type": "prune",
                "heads_per_layer": 2,
                "ffn_size": 48,
                "importance_batches": 2,
                "recover_epochs": 2,
                "batch_size": 16,
                "learning_rate": 2e-3,
            },  # fmt: skip
            {"type": "export"},
            {"type": "optimize"},
            {"type": "quantize", "instruction_set": "avx2"},
        ],
        # every candidate qualifies and the smallest wins: the INT8 graph, whatever the timings
        "select": {"max_accuracy_drop": 100, "objective": "size", "finalist_rounds": 0},
    }
    run_recipe(load_recipe(write_recipe(recipe)))
    run, repo = tmp_path / "run", tmp_path / "repo"
    assert Manifest.load(run, writable=False).selection["stage"] == "quantize"
    pushed = CliRunner().invoke(app, ["push", str(run), "--repo-id", "user/toy", "--local-dir", str(repo)])
    assert pushed.exit_code == 0, pushed.output

    # (a) the root really has pruned heads, in the layout every transformers version loads
    config = json.loads((repo / "config.json").read_text())
    assert "pruned_heads" not in config and config["toolkit_pruned_heads"]
    assert max(map(len, config["toolkit_pruned_heads"].values())) == 2  # 2 of the 4 heads cut in a layer

    texts = TEXTS
    own = toolkit_answers(run, texts)
    assert own["truncated"].count(True) == 1 and min(map(len, texts)) == 4  # one beyond max_length; one word
    assert own["stages"] == {"selected": "quantize", "root": "prune", "export": "export"}
    names, root = own["labels"], own["logits"]["prune"]

    # (b) stock transformers 5, which cannot see toolkit, loads the root with toolkit's logits
    tf5 = transformers5_logits(repo, texts)
    assert tf5["transformers"] == TESTED_TRANSFORMERS_5 and not tf5["sees_toolkit"]
    assert not any(tf5["loading"].values()), tf5["loading"]  # no missing, unexpected or mismatched weights
    assert np.abs(tf5["logits"] - root).max() < 1e-4
    assert tf5["logits"].argmax(-1).tolist() == root.argmax(-1).tolist()
    assert tf5["pipeline"] == [names[i] for i in root.argmax(-1)]

    # (c) transformers.js: q8 is the INT8 graph `toolkit predict` serves, fp32 the export
    if shutil.which("node") is None:
        pytest.skip("node is not installed: transformers.js not checked (transformers 5 passed)")
    predicted = toolkit_predict(run, texts)
    assert predicted == [names[i] for i in own["logits"]["quantize"].argmax(-1)]
    q8 = transformers_js_classes(repo, texts, "q8")
    assert q8["transformers_js"] == TESTED_TRANSFORMERS_JS and "onnx/model_quantized.onnx" in q8["files"]
    assert q8["labels"] == predicted
    fp32 = transformers_js_classes(repo, texts, "fp32")
    assert "onnx/model.onnx" in fp32["files"] and "onnx/model_quantized.onnx" not in fp32["files"]
    assert fp32["labels"] == [names[i] for i in own["logits"]["export"].argmax(-1)]
    result = {"texts": texts, "toolkit": own, "predict": predicted, "transformers5": tf5, "js_q8": q8, "js_fp32": fp32}
    result["figures"] = figures(result)
    print(table(result))
    # The probabilities too, where the input is the same (a text beyond max_length loses its final [SEP] in
    # transformers.js's truncation): the same graphs in Node's ONNX Runtime. INT8 with more room: transformers.js
    # keeps ONNX Runtime's SkipLayerNorm fusion, which toolkit turns off on the CPU, and the activations'
    # quantization can carry that rounding on (3.3e-3 on a 3-layer MiniLM's INT8 graph, 6e-8 with the fusion on).
    assert result["figures"]["js_fp32_max_prob_diff"] < 1e-4 and result["figures"]["js_q8_max_prob_diff"] < 1e-2
