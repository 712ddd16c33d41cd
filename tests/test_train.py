"""Fine-tuning on the toy task through the real pipeline: the model learns, the folder is standard."""

from __future__ import annotations

import json

from toolkit.pipeline import run_recipe
from toolkit.recipe import load_recipe


def test_tiny_fine_tune_learns_separable_task(toy_recipe, write_recipe, tmp_path):
    recipe = load_recipe(write_recipe(toy_recipe))
    manifest = run_recipe(recipe)
    entry = manifest.stage("train")
    assert entry["status"] == "done"
    assert entry["evaluation"]["accuracy"] >= 0.9, entry["evaluation"]
    assert entry["info"]["history"][-1]["accuracy"] >= 0.9

    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(tmp_path / "run" / "train")
    assert model.config.id2label == {0: "negative", 1: "positive"}
    assert model.config.label2id == {"negative": 0, "positive": 1}
    saved = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert saved["stages"]["train"]["evaluation"]["speed"]["threads"] == 1
    assert saved["data"]["label_names"] == ["negative", "positive"]
