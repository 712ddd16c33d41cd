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


def test_group_by_length_pads_less_and_still_sees_every_text_once(tiny_model):
    from datasets import Dataset, DatasetDict
    from transformers import AutoTokenizer

    from toolkit.config import LoopOptions
    from toolkit.training import make_dataloaders

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    texts = [" ".join(["good"] * (1 + i % 23)) for i in range(200)]
    split = Dataset.from_dict({"text": texts, "label": [i % 2 for i in range(200)]})
    encoded = split.map(lambda b: tokenizer(b["text"]), batched=True, remove_columns=["text"])
    encoded = encoded.rename_column("label", "labels")
    tokenized = DatasetDict({"train": encoded, "validation": encoded})

    def epoch(group: bool) -> tuple[int, list[int]]:
        opts = LoopOptions(batch_size=8, group_by_length=group)
        train_dl, _ = make_dataloaders(tokenized, tokenizer, opts)
        padded, seen = 0, []
        for batch in train_dl:
            padded += int((batch["attention_mask"] == 0).sum())
            seen += batch["attention_mask"].sum(dim=1).tolist()
        return padded, sorted(seen)

    grouped, grouped_seen = epoch(True)
    shuffled, shuffled_seen = epoch(False)
    assert grouped_seen == shuffled_seen == sorted(len(ids) for ids in encoded["input_ids"])
    assert grouped < shuffled / 3, (grouped, shuffled)


def test_patience_stops_once_validation_stops_improving_and_keeps_the_best_epoch(toy_recipe, write_recipe):
    toy_recipe["stages"][0].update(epochs=40, patience=2)
    manifest = run_recipe(load_recipe(write_recipe(toy_recipe)))
    info = manifest.stage("train")["info"]
    scores = [row["accuracy"] for row in info["history"]]
    assert info["stopped_early"] and info["epochs_run"] == len(scores) < 40
    assert info["best_epoch"] == len(scores) - 2  # two epochs without a better score, then the stop
    assert max(scores[-2:]) <= scores[info["best_epoch"] - 1] == max(scores)
    assert manifest.stage("train")["evaluation"]["accuracy"] >= 0.9 and info["curve"]


def test_curve_diagnosis_names_what_the_validation_curve_says():
    from toolkit.training import diagnose

    assert diagnose([0.70, 0.75, 0.78]).startswith("still improving at the last epoch (+3.00 pts")
    assert diagnose([0.800, 0.801, 0.803]).startswith("flat from the first epoch")
    assert diagnose([0.80, 0.79, 0.78]).startswith("best at epoch 1, then up to 2.00 pts lower")
    assert diagnose([0.70, 0.80, 0.79, 0.78]).startswith("peaked at epoch 2 of 4")
    assert diagnose([0.70, 0.75, 0.751]).startswith("levelling off")
    assert diagnose([0.8]).startswith("one epoch")
