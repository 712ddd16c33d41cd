"""Structured pruning: slicing round-trips through save/load and ONNX, importance finds planted heads, targets
are checked at validation, and the stage runs in the pipeline."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from toolkit import pruning
from toolkit.recipe import RecipeError, load_recipe
from toolkit.stages.prune import round_targets


def classifier(folder, **kwargs):
    from transformers import AutoModelForSequenceClassification

    return AutoModelForSequenceClassification.from_pretrained(
        folder, num_labels=2, id2label={0: "negative", 1: "positive"}, label2id={"negative": 0, "positive": 1}, **kwargs
    ).eval()


def encoded(folder, texts=("the film was superb", "a dull plot and it was bad very")):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder)(list(texts), padding=True, return_tensors="pt")


def test_uneven_heads_and_ffn_round_trip_through_save_load_and_onnx(tiny_model, tmp_path):
    """The saved folder is uniform (every head, pruned ones as zeros): stock `from_pretrained`, which is all
    transformers 5 can do, gives the pruned model's logits; toolkit's loader slices the zeros away again."""
    from optimum.onnxruntime import ORTModelForSequenceClassification
    from transformers import AutoTokenizer

    from toolkit.runtime.checkpoint import PRUNED_HEADS_KEY, load_classifier

    torch.manual_seed(1)
    model = classifier(tiny_model)
    pruning.keep_heads(model, [[0, 3], [2]])  # uneven: 2 heads then 1 head
    pruning.keep_neurons(model, [list(range(0, 64, 2)), list(range(32))])
    inputs = encoded(tiny_model)
    with torch.no_grad():
        expected = model(**inputs).logits
    assert pruning.save_uniform(model, tmp_path / "pruned") == {"0": [1, 2], "1": [0, 1, 3]}
    AutoTokenizer.from_pretrained(tiny_model).save_pretrained(tmp_path / "pruned")
    config = json.loads((tmp_path / "pruned" / "config.json").read_text())
    assert "pruned_heads" not in config and config[PRUNED_HEADS_KEY] == {"0": [1, 2], "1": [0, 1, 3]}
    assert config["intermediate_size"] == 32
    assert model.config.pruned_heads == {0: [1, 2], 1: [0, 1, 3]}  # the model in memory is left as it was

    stock = classifier(tmp_path / "pruned")
    assert pruning.head_counts(stock) == [4, 4]
    value = stock.bert.encoder.layer[1].attention.self.value
    size = value.out_features // 4
    assert value.weight[: 2 * size].abs().sum() == 0 and value.weight[2 * size : 3 * size].abs().sum() > 0
    with torch.no_grad():
        torch.testing.assert_close(stock(**inputs).logits, expected, rtol=0, atol=1e-6)

    torch.manual_seed(7)
    reloaded = load_classifier(tmp_path / "pruned").eval()
    drawn = torch.rand(3)
    torch.manual_seed(7)
    assert torch.equal(drawn, torch.rand(3))  # loading moved no seeded stream (a training run's dropout, shuffling)
    assert pruning.head_counts(reloaded) == [2, 1]
    assert pruning.kept_heads(reloaded.config) == [[0, 3], [2]]
    assert not hasattr(reloaded.config, PRUNED_HEADS_KEY)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**inputs).logits, expected, rtol=0, atol=1e-6)
    # Saved again (as every later stage does), the folder is the same uniform one.
    pruning.save_uniform(reloaded, tmp_path / "again")
    assert json.loads((tmp_path / "again" / "config.json").read_text())[PRUNED_HEADS_KEY] == config[PRUNED_HEADS_KEY]
    onnx = ORTModelForSequenceClassification.from_pretrained(tmp_path / "pruned", export=True)
    onnx_logits = onnx(**encoded(tmp_path / "pruned")).logits
    np.testing.assert_allclose(np.asarray(onnx_logits), expected.numpy(), atol=1e-4)


def test_second_pruning_keeps_original_head_indices(tiny_model, tmp_path):
    from toolkit.runtime.checkpoint import load_classifier

    model = classifier(tiny_model)
    pruning.keep_heads(model, [[1, 2, 3], [0, 1, 2, 3]])
    pruning.save_uniform(model, tmp_path / "once")
    model = load_classifier(tmp_path / "once")
    pruning.keep_heads(model, [[0, 2], [3]])  # current indices: layer 0 keeps original heads 1 and 3
    assert pruning.kept_heads(model.config) == [[1, 3], [3]]
    pruning.save_uniform(model, tmp_path / "twice")
    assert pruning.head_counts(load_classifier(tmp_path / "twice")) == [2, 1]
    assert pruning.head_counts(classifier(tmp_path / "twice")) == [4, 4]


def test_distilbert_heads_zero_filled_load_stock(tmp_path):
    """DistilBERT's own layout (q_lin/k_lin/v_lin, out_lin, n_heads) takes the same uniform save."""
    from transformers import DistilBertConfig, DistilBertForSequenceClassification

    from toolkit.runtime.checkpoint import load_classifier

    torch.manual_seed(2)
    config = DistilBertConfig(vocab_size=64, dim=32, n_heads=4, hidden_dim=48, n_layers=2, num_labels=3)
    model = DistilBertForSequenceClassification(config).eval()
    pruning.keep_heads(model, [[1], [0, 2, 3]])
    ids = torch.tensor([[1, 5, 9, 11, 0, 0], [3, 4, 5, 6, 7, 8]])
    mask = (ids != 0).long()
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=mask).logits
    pruning.save_uniform(model, tmp_path / "d")
    stock = DistilBertForSequenceClassification.from_pretrained(tmp_path / "d").eval()
    compact = load_classifier(tmp_path / "d").eval()
    assert pruning.head_counts(stock) == [4, 4] and pruning.head_counts(compact) == [1, 3]
    with torch.no_grad():
        for loaded in (stock, compact):
            torch.testing.assert_close(loaded(input_ids=ids, attention_mask=mask).logits, expected, rtol=0, atol=1e-6)


def test_never_removes_every_head_of_a_layer(tiny_model):
    model = classifier(tiny_model)
    with pytest.raises(pruning.PruningError, match="every attention head"):
        pruning.keep_heads(model, [[0], []])
    with pytest.raises(pruning.PruningError, match="same, non-zero"):
        pruning.keep_neurons(model, [[0, 1], [0]])


def test_importance_ranks_planted_important_head_above_useless_one(tiny_model):
    """Layer 0: head 1's value weights are zeroed (it contributes nothing); head 2's output is scaled up, so the
    loss depends on it most."""
    model = classifier(tiny_model)
    attention = model.bert.encoder.layer[0].attention
    size = attention.self.attention_head_size
    with torch.no_grad():
        attention.self.value.weight[size : 2 * size] = 0
        attention.self.value.bias[size : 2 * size] = 0
        attention.output.dense.weight[:, 2 * size : 3 * size] *= 8
    inputs = encoded(tiny_model)
    batches = [{**inputs, "labels": torch.tensor([1, 0])}] * 3
    heads, neurons = pruning.importance(model, batches)
    assert heads[0][1] == pytest.approx(0.0, abs=1e-7)
    assert heads[0][2] == max(heads[0])
    assert float(heads[0].norm()) == pytest.approx(1.0)
    assert [len(n) for n in neurons] == [64, 64]
    assert pruning.top_indices(heads[0], 1) == [2]
    assert 1 not in pruning.top_indices(heads[0], 3)


def test_round_targets_reach_goal_in_steps():
    assert round_targets([12, 12], [8, 4], 2) == [[10, 8], [8, 4]]
    assert round_targets([1536], [1024], 1) == [[1024]]


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"heads_per_layer": 0}, "heads_per_layer must be a whole number >= 1"),
        ({"heads_per_layer": 1.5}, "strictly between 0 and 1"),
        ({"ffn_size": -3}, "ffn_size must be a whole number >= 1"),
        ({"heads_per_layer": 5}, "heads_per_layer: 5 is more than the model has (4)"),
        ({"ffn_size": 65}, "ffn_size: 65 is more than the model has (64)"),
        ({}, "set heads_per_layer and/or ffn_size"),
        ({"heads_per_layer": 2, "epochs": 2}, "use recover_epochs"),
    ],
)
def test_bad_targets_rejected_at_validation(toy_recipe, write_recipe, options, message):
    toy_recipe["stages"].append({"type": "prune", **options})
    with pytest.raises(RecipeError) as err:
        load_recipe(write_recipe(toy_recipe))
    assert message in str(err.value), str(err.value)


def test_second_prune_checked_against_first(toy_recipe, write_recipe):
    toy_recipe["stages"] += [
        {"type": "prune", "ffn_size": 40},
        {"type": "prune", "name": "again", "ffn_size": 50},
    ]
    with pytest.raises(RecipeError, match=r"stages\[2\] \(again\): ffn_size: 50 is more than the model has \(40\)"):
        load_recipe(write_recipe(toy_recipe))


def test_prune_stage_in_pipeline(toy_recipe, write_recipe, tmp_path):
    from toolkit.pipeline import run_recipe

    toy_recipe["stages"].append(
        {"type": "prune", "heads_per_layer": 0.5, "ffn_size": 40, "iterations": 2, "importance_batches": 4,
         "recover_epochs": 2, "batch_size": 16, "learning_rate": 5e-4}
    )  # fmt: skip
    manifest = run_recipe(load_recipe(write_recipe(toy_recipe)))
    entry = manifest.stage("prune")
    assert entry["status"] == "done", entry.get("error")
    info = entry["info"]
    assert info["heads_per_layer"] == [2, 2] and info["ffn_size"] == 40
    assert [r["heads_per_layer"] for r in info["rounds"]] == [[3, 3], [2, 2]]
    assert [r["ffn_size"] for r in info["rounds"]] == [52, 40]
    saved = json.loads((tmp_path / "run" / "prune" / "pruning.json").read_text())
    assert saved["kept_heads"] == info["kept_heads"]
    model = classifier(tmp_path / "run" / "prune")  # stock: the pruned heads are there, as zeros
    assert pruning.head_counts(model) == [4, 4] and pruning.ffn_sizes(model) == [40, 40]
    stock = entry["evaluation"]["stock_load"]  # ... and answer the whole evaluation split as the compact model
    assert stock["agreement"] == 1 and stock["max_abs_diff"] <= 1e-4 and stock["n"] == entry["evaluation"]["n"]
    pruned = {layer: sorted(set(range(4)) - set(kept)) for layer, kept in enumerate(info["kept_heads"])}
    assert {int(k): v for k, v in stock["zero_filled_heads"].items()} == pruned
    from toolkit.hub import model_card
    from toolkit.manifest import Artifact

    card = model_card(manifest, Artifact(tmp_path / "run" / "prune", "pytorch", "prune"), "user/pruned")
    assert "the 4 heads pruning removed are there as zeros" in card and "100.00 % the same class" in card
    assert (
        "| root: `model.safetensors`, `config.json`, tokenizer |" in card and "onnx/" not in card.split("## Recipe")[0]
    )
    assert entry["evaluation"]["accuracy"] >= 0.85, entry["evaluation"]
    assert entry["evaluation"]["parity"]["n"] == entry["evaluation"]["n"]


def test_targets_keep_at_least_one_head_and_respect_uneven_layers(tiny_model):
    from toolkit.stages.prune import PruneConfig, targets

    model = classifier(tiny_model)
    pruning.keep_heads(model, [[0, 1, 2, 3], [1]])  # uneven: 4 heads, then 1
    tiny = PruneConfig(type="prune", heads_per_layer=0.01)
    assert targets(tiny, model) == ([1, 1], 64)
    assert targets(PruneConfig(type="prune", heads_per_layer=2, ffn_size=0.5), model) == ([2, 1], 32)
    with pytest.raises(ValueError, match="more than the model has"):
        targets(PruneConfig(type="prune", heads_per_layer=5), model)
