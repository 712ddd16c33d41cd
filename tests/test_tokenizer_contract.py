"""One tokenizer contract from training to serving: the runtime truncates on the side transformers truncates on in
training, padding on the left is refused where a fused graph would read it wrong, and `model.max_length` must fit
the model's position table, all checked before any work."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from test_runtime import LABELS, MAX_LENGTH, TEXTS, classifier

from toolkit.manifest import Artifact
from toolkit.recipe import RecipeError, parse_recipe
from toolkit.runtime import Tokenizer, load_model
from toolkit.serving.bundle import write_bundle
from toolkit.serving.model import ServedModel

LONG = [
    "the plot was dull and the actor was poor but the story and the film were superb " * 3,
    " ".join(["very"] * 40) + " awful",
    "电影 很 好 看 " * 10,
]


def with_tokenizer_config(folder: Path, **settings) -> Path:
    config_file = folder / "tokenizer_config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), **settings}))
    return folder


def test_runtime_truncates_on_the_tokenizers_truncation_side_as_transformers_does(tiny_model, tmp_path):
    from transformers import AutoTokenizer

    folder = with_tokenizer_config(shutil.copytree(tiny_model, tmp_path / "left"), truncation_side="left")
    theirs = AutoTokenizer.from_pretrained(folder)
    assert theirs.truncation_side == "left"
    texts = [*LONG, *TEXTS]
    expected = theirs(texts, truncation=True, max_length=MAX_LENGTH)["input_ids"]
    ours = Tokenizer(folder, MAX_LENGTH)(texts)
    lengths = ours["attention_mask"].sum(axis=1)
    assert [row[:n].tolist() for row, n in zip(ours["input_ids"], lengths, strict=True)] == expected
    # [CLS] ... [SEP] with the beginning cut: the text's last word pieces are kept.
    pieces = theirs(LONG[0], add_special_tokens=False)["input_ids"]
    assert len(pieces) > MAX_LENGTH
    assert expected[0] == [theirs.cls_token_id, *pieces[-(MAX_LENGTH - 2) :], theirs.sep_token_id]

    with_tokenizer_config(folder, truncation_side="middle")
    with pytest.raises(ValueError, match=r"truncation_side 'middle' is not 'left' or 'right'"):
        Tokenizer(folder, MAX_LENGTH)


def test_bundle_serves_what_the_model_gives_on_trainings_truncation(tiny_model, tmp_path):
    """The tokenizer settings travel with the model into the bento (its tokenizer_config.json): the served
    logits are the PyTorch model's on transformers' left-truncated inputs."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    folder = with_tokenizer_config(classifier(tiny_model, tmp_path / "pt"), truncation_side="left")
    meta = {"format": "pytorch", "stage": "train", "labels": LABELS, "max_length": MAX_LENGTH}
    write_bundle(Artifact(folder, "pytorch", "train"), tmp_path / "bundle", meta)
    served = ServedModel(tmp_path / "bundle", threads=1, device="cpu").logits(LONG)
    batch = AutoTokenizer.from_pretrained(folder)(
        LONG, padding=True, truncation=True, max_length=MAX_LENGTH, return_tensors="pt"
    )
    with torch.inference_mode():
        expected = AutoModelForSequenceClassification.from_pretrained(folder)(**batch).logits.numpy()
    np.testing.assert_allclose(served, expected, atol=1e-5)


def recipe_with(tiny_model: Path, toy_data: Path, max_length: int = MAX_LENGTH, stages: list | None = None) -> dict:
    return {
        "name": "t",
        "data": {"train": str(toy_data)},
        "model": {"name": str(tiny_model), "max_length": max_length},
        "stages": stages or [{"type": "train"}],
    }


def test_left_padding_with_a_fused_graph_is_refused_before_any_work(tiny_model, toy_data, tmp_path):
    folder = with_tokenizer_config(shutil.copytree(tiny_model, tmp_path / "left"), padding_side="left")
    stages = [{"type": "train"}, {"type": "export"}, {"type": "optimize"}, {"type": "quantize"}]
    with pytest.raises(RecipeError) as info:
        parse_recipe(recipe_with(folder, toy_data, stages=stages), tmp_path)
    (problem,) = info.value.problems
    assert problem.startswith("(top level): stages[2] (optimize): level O2 fuses attention")
    assert "padding_side: left in its tokenizer_config.json" in problem
    assert "Set padding_side to right" in problem and "level: O1" in problem
    stages[2]["level"] = "O1"  # no fusion: the graph reads any padding
    assert parse_recipe(recipe_with(folder, toy_data, stages=stages), tmp_path).stages[2].level == "O1"
    assert parse_recipe(recipe_with(folder, toy_data, stages=stages[:2]), tmp_path)  # no optimize stage
    stages[2]["level"] = "O3"
    with_tokenizer_config(folder, padding_side="right")
    assert parse_recipe(recipe_with(folder, toy_data, stages=stages), tmp_path)


def test_runtime_pads_on_the_right_whatever_the_tokenizer_says(tiny_model, tmp_path):
    """The decision documented in toolkit/runtime/tokenizer.py: each text's answer is its answer alone."""
    folder = with_tokenizer_config(shutil.copytree(tiny_model, tmp_path / "left"), padding_side="left")
    batch = Tokenizer(folder, MAX_LENGTH)(TEXTS)
    assert (batch["attention_mask"][:, 0] == 1).all()  # every row starts with its text, padding at the end
    model = load_model(classifier(folder, tmp_path / "pt"), "pytorch", MAX_LENGTH, 1, "cpu")
    alone = np.concatenate([model.logits([text]) for text in TEXTS])
    model.buckets = False  # one call, every text padded to the longest
    np.testing.assert_allclose(model.logits(TEXTS), alone, atol=1e-5)


def test_max_length_must_fit_the_models_position_table(tiny_model, toy_data, tmp_path):
    with pytest.raises(RecipeError) as info:
        parse_recipe(recipe_with(tiny_model, toy_data, max_length=65), tmp_path)
    assert info.value.problems == [
        "model.max_length: 65 tokens are more than the model has positions for (64: max_position_embeddings 64 "
        "in its config.json); set model.max_length to at most 64 (got 65)"
    ]
    assert parse_recipe(recipe_with(tiny_model, toy_data, max_length=64), tmp_path).model.max_length == 64

    roberta = shutil.copytree(tiny_model, tmp_path / "roberta")
    config = json.loads((roberta / "config.json").read_text())
    shape = {"model_type": "roberta", "pad_token_id": 1, "max_position_embeddings": 66}
    (roberta / "config.json").write_text(json.dumps({**config, **shape}))
    with pytest.raises(RecipeError, match=r"model.max_length: 65 tokens .*\(64: max_position_embeddings 66 in its "
                       r"config.json minus 2: a roberta model numbers positions from padding_idx \+ 1 = 2\)"):  # fmt: skip
        parse_recipe(recipe_with(roberta, toy_data, max_length=65), tmp_path)
    assert parse_recipe(recipe_with(roberta, toy_data, max_length=64), tmp_path)

    student = shutil.copytree(tiny_model, tmp_path / "student")
    (student / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 24}))
    stages = [{"type": "train"}, {"type": "distill", "student": {"model": str(student)}}]
    with pytest.raises(RecipeError, match=r"stages\[1\] \(distill\): model.max_length: 32 tokens are more than its "
                       r"student.model .*student has positions for \(24"):  # fmt: skip
        parse_recipe(recipe_with(tiny_model, toy_data, max_length=32, stages=stages), tmp_path)
    assert parse_recipe(recipe_with(tiny_model, toy_data, max_length=24, stages=stages), tmp_path)
