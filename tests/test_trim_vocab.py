"""`trim_vocab`: the pieces the training texts use are kept, the embedding and the tokenizer (WordPiece and
sentencepiece/Unigram) are rewritten, the folder loads with transformers, and the ONNX stages run on it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import toy_examples
from test_families import xlmr_style_bert
from typer.testing import CliRunner

from toolkit.cli import app
from toolkit.recipe import RecipeError, load_recipe

TRAIN = {"type": "train", "epochs": 8, "batch_size": 16, "learning_rate": 2e-3, "warmup_ratio": 0.0}


def classifier(folder: Path, dest: Path) -> Path:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    AutoModelForSequenceClassification.from_pretrained(folder, num_labels=2).save_pretrained(dest)
    AutoTokenizer.from_pretrained(folder).save_pretrained(dest)
    return dest


@pytest.fixture(params=["wordpiece", "unigram"])
def model_folder(request, tiny_model, tmp_path) -> Path:
    if request.param == "wordpiece":
        return classifier(tiny_model, tmp_path / "bert")
    corpus = [t for t, _ in toy_examples(400)] + [f"extra{i} words{i}" for i in range(300)]
    return classifier(xlmr_style_bert(tmp_path / "e5-like-base", corpus), tmp_path / "e5-like")


def test_trimmed_folder_loads_and_tokenizes_the_corpus_alike(model_folder, tmp_path):
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from toolkit.vocabulary import trim_embeddings, used_ids, write_tokenizer

    corpus = [t for t, _ in toy_examples(60, seed=5)]
    keep = used_ids(model_folder / "tokenizer.json", corpus)
    model = AutoModelForSequenceClassification.from_pretrained(model_folder).eval()
    sizes = trim_embeddings(model, keep)
    out = tmp_path / "trimmed"
    model.save_pretrained(out)
    write_tokenizer(model_folder, out, keep)
    assert sizes["vocab_after"] == len(keep) < sizes["vocab_before"]

    old_tok, new_tok = AutoTokenizer.from_pretrained(model_folder), AutoTokenizer.from_pretrained(out)
    assert len(new_tok) == len(keep) and new_tok.pad_token == old_tok.pad_token
    old_enc, new_enc = old_tok(corpus)["input_ids"], new_tok(corpus)["input_ids"]
    assert [old_tok.convert_ids_to_tokens(i) for i in old_enc] == [new_tok.convert_ids_to_tokens(i) for i in new_enc]
    new_id = {int(old): new for new, old in enumerate(keep)}
    assert [[new_id[i] for i in ids] for ids in old_enc] == new_enc

    original = AutoModelForSequenceClassification.from_pretrained(model_folder).eval()
    trimmed = AutoModelForSequenceClassification.from_pretrained(out).eval()
    assert trimmed.config.vocab_size == len(keep)
    with torch.inference_mode():
        a = original(**old_tok(corpus, padding=True, return_tensors="pt")).logits
        b = trimmed(**new_tok(corpus, padding=True, return_tensors="pt")).logits
    np.testing.assert_allclose(a.numpy(), b.numpy(), atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["wordpiece", "unigram"])
def test_trim_vocab_stage_then_the_onnx_stages_with_every_gate(kind, tiny_model, toy_recipe, write_recipe, tmp_path):
    from toolkit.runtime import load_model

    if kind == "unigram":
        corpus = [t for t, _ in toy_examples(400)] + [f"extra{i} words{i}" for i in range(300)]
        toy_recipe["model"]["name"] = str(xlmr_style_bert(tmp_path / "e5-like", corpus))
    stages = [TRAIN, {"type": "trim_vocab"}, {"type": "export"}, {"type": "optimize"}, {"type": "quantize"}]
    toy_recipe["stages"] = stages
    toy_recipe["stages"][-1] = {"type": "quantize", "parity": {"min_agreement": 0.95}}
    result = CliRunner().invoke(app, ["run", str(write_recipe(toy_recipe))])
    assert result.exit_code == 0, result.output
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    entries = manifest["stages"]
    assert [entries[s["type"]]["status"] for s in stages] == ["done"] * len(stages)
    info = entries["trim_vocab"]["info"]
    assert info["vocab_after"] < info["vocab_before"] and info["parameters"]["after"] < info["parameters"]["before"]
    assert entries["trim_vocab"]["gate"]["passed"] and entries["export"]["input"]["stage"] == "trim_vocab"
    trimmed = Path(entries["trim_vocab"]["output"]["path"])
    assert json.loads((trimmed / "config.json").read_text())["vocab_size"] == info["vocab_after"]
    optimized = Path(entries["optimize"]["output"]["path"])
    texts = [t for t, _ in toy_examples(20, seed=9)]
    np.testing.assert_allclose(
        load_model(optimized, "onnx", 16, 1, "cpu").logits(texts),
        load_model(trimmed, "pytorch", 16, 1, "cpu").logits(texts),
        atol=1e-4,
    )


def test_trim_vocab_needs_a_fine_tuned_model_and_an_existing_corpus(toy_recipe, write_recipe, tmp_path):
    toy_recipe["stages"] = [{"type": "trim_vocab"}, TRAIN]
    with pytest.raises(RecipeError, match=r"trim_vocab works on a fine-tuned model.*after an enabled train stage"):
        load_recipe(write_recipe(toy_recipe))
    toy_recipe["stages"] = [TRAIN, {"type": "trim_vocab", "extra_corpus": "nowhere.txt"}]
    with pytest.raises(RecipeError, match=r"extra_corpus: 'nowhere.txt' not found"):
        load_recipe(write_recipe(toy_recipe))
    (tmp_path / "more.txt").write_text("more words\n")
    toy_recipe["stages"][1]["extra_corpus"] = "more.txt"
    assert load_recipe(write_recipe(toy_recipe)).stages[1].extra_corpus == str(tmp_path / "more.txt")
