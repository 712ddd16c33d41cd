"""Distillation: the student learns from the teacher on the toy task, keeps its labels, takes its shape from
teacher layers or another model, and runs under `accelerate launch` with two processes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import launch_two_processes

from toolkit.config import spaced_layers
from toolkit.pipeline import StageError, run_recipe
from toolkit.recipe import RecipeError, load_recipe


def four_layer_teacher(tiny_model, tmp_path) -> Path:
    """A 4-layer encoder with the fixture's tokenizer, so a 2-layer student is a real cut."""
    from transformers import AutoTokenizer, BertConfig, BertModel

    config = BertConfig.from_pretrained(tiny_model, num_hidden_layers=4)
    folder = tmp_path / "teacher4"
    BertModel(config).save_pretrained(folder)
    AutoTokenizer.from_pretrained(tiny_model).save_pretrained(folder)
    return folder


def distill_stage(**options) -> dict:
    base = {"type": "distill", "epochs": 6, "batch_size": 16, "learning_rate": 1e-3, "warmup_ratio": 0.0}
    return {**base, **options}


def test_spaced_layers_default_mapping():
    assert spaced_layers(6, 3) == [1, 3, 5]
    assert spaced_layers(12, 3) == [3, 7, 11]
    assert spaced_layers(4, 4) == [0, 1, 2, 3]


def test_layer_student_keeps_pruned_shape_and_teacher_labels(toy_recipe, write_recipe, tmp_path):
    toy_recipe["model"]["name"] = str(four_layer_teacher(Path(toy_recipe["model"]["name"]), tmp_path))
    toy_recipe["data"]["labels"] = ["positive", "negative"]  # not sorted order: ids must travel with the model
    student = {"student": {"layers": [1, 3]}, "hidden_mse_weight": 1.0, "attention_mse_weight": 1.0}
    toy_recipe["stages"] += [
        {"type": "prune", "heads_per_layer": 2, "ffn_size": 48, "importance_batches": 2},
        distill_stage(**student, hard_label_weight=0.5, temperature_schedule="linear_decay"),
    ]
    manifest = run_recipe(load_recipe(write_recipe(toy_recipe)))
    teacher, distilled = manifest.stage("prune"), manifest.stage("distill")
    assert distilled["status"] == "done", distilled.get("error")
    assert teacher["evaluation"]["accuracy"] >= 0.9
    assert distilled["evaluation"]["accuracy"] >= 0.9, distilled["evaluation"]
    assert distilled["info"]["layer_map"] == [1, 3] and distilled["info"]["student_layers"] == 2

    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(tmp_path / "run" / "distill")
    assert config.id2label == {0: "positive", 1: "negative"}
    assert config.label2id == {"positive": 0, "negative": 1}
    assert config.num_hidden_layers == 2 and config.intermediate_size == 48
    # The pruned teacher's shape, renumbered; its pruned heads saved as zeros so stock transformers loads it.
    assert {int(k) for k in config.toolkit_pruned_heads} == {0, 1} and not config.pruned_heads


def test_distillation_teaches_another_model_through_a_projection(toy_recipe, write_recipe, tmp_path):
    """A narrower random-weight student (hidden 16 vs 32, configured for 3 labels): distilled, it learns the
    task that it cannot do untrained; num_labels and label names come from the teacher."""
    from transformers import AutoTokenizer, BertConfig, BertModel

    tiny = Path(toy_recipe["model"]["name"])
    config = BertConfig.from_pretrained(tiny, hidden_size=16, num_attention_heads=2, intermediate_size=32,
                                        num_hidden_layers=1, num_labels=3)  # fmt: skip
    folder = tmp_path / "narrow"
    BertModel(config).save_pretrained(folder)
    AutoTokenizer.from_pretrained(tiny).save_pretrained(folder)
    toy_recipe["stages"].append(
        distill_stage(
            student={"model": str(folder)}, hidden_mse_weight=0.5, epochs=20, hard_label_weight=1.0, temperature=2.0
        )
    )
    manifest = run_recipe(load_recipe(write_recipe(toy_recipe)))
    entry = manifest.stage("distill")
    assert entry["status"] == "done", entry.get("error")
    assert entry["info"]["layer_map"] == [1]
    saved = json.loads((tmp_path / "run" / "distill" / "config.json").read_text())
    assert saved["hidden_size"] == 16 and saved["id2label"] == {"0": "negative", "1": "positive"}
    assert entry["evaluation"]["accuracy"] >= 0.85, entry["evaluation"]
    untrained = untrained_accuracy(folder, tmp_path / "run" / "data")
    assert untrained < entry["evaluation"]["accuracy"] - 0.2, untrained


def untrained_accuracy(folder: Path, data_dir: Path) -> float:
    """The same student before distillation: its weights and a fresh two-label head."""
    import torch
    from transformers import AutoModelForSequenceClassification

    from toolkit.data import PreparedData
    from toolkit.runtime.model import TorchModel

    torch.manual_seed(0)
    predictor = TorchModel(folder, max_length=16, threads=1, device="cpu")
    predictor.model = AutoModelForSequenceClassification.from_pretrained(folder, num_labels=2).eval()
    data = PreparedData(data_dir, ["negative", "positive"], "")
    logits = predictor.logits_batched(data.texts("test"), 64)
    return float((logits.argmax(-1) == data.labels("test")).mean())


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"student": {"num_layers": 3}}, "student.num_layers 3 is more than the teacher's 2 layers"),
        ({"student": {"layers": [0, 2]}}, "teacher layer indices [2] do not exist"),
        ({"student": {"layers": [0], "num_layers": 1}}, "exactly one of layers, num_layers, model"),
        ({"student": {}}, "exactly one of layers, num_layers, model"),
        ({"student": {"num_layers": 1}, "layer_map": [0, 1]}, "layer_map has 2 entries for a 1-layer student"),
        ({"student": {"model": "./missing-folder"}}, "neither an existing folder"),
        ({"student": {"num_layers": 1}, "kd_weight": 0}, "every loss weight is 0"),
        ({"student": {"num_layers": 1}, "temperature": 0}, "greater than 0"),
        (
            {"student": {"num_layers": 1}, "augment": {"copies": 1, "noise": 0.1}},
            "augment.noise: unknown key; allowed keys: copies",
        ),
        ({"student": {"num_layers": 1}, "augment": {"copies": 9}}, "augment.copies"),
    ],
)
def test_bad_distill_options_rejected_at_validation(toy_recipe, write_recipe, options, message):
    toy_recipe["stages"].append({"type": "distill", **options})
    with pytest.raises(RecipeError) as err:
        load_recipe(write_recipe(toy_recipe))
    assert message in str(err.value), str(err.value)


@pytest.mark.slow
def test_two_process_distillation_under_accelerate_launch(toy_recipe, write_recipe, tmp_path):
    toy_recipe["stages"] += [
        {"type": "prune", "heads_per_layer": 2, "importance_batches": 2, "recover_epochs": 1, "batch_size": 16},
        distill_stage(
            student={"num_layers": 1}, hidden_mse_weight=1.0, attention_mse_weight=1.0, epochs=4, augment={"copies": 1}
        ),
    ]
    launch_two_processes(write_recipe(toy_recipe), tmp_path)
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    for name in ("prune", "distill"):
        assert manifest["stages"][name]["status"] == "done"
    distill = manifest["stages"]["distill"]
    assert distill["info"]["num_processes"] == 2
    assert manifest["stages"]["prune"]["info"]["recovery"]["num_processes"] == 2
    assert distill["evaluation"]["accuracy"] >= 0.8, distill["evaluation"]
    # Every training text and its one noisy copy, once per epoch run, whichever process read it.
    assert distill["info"]["texts_seen"] == manifest["data"]["counts"]["train"] * distill["info"]["epochs_run"] * 2


def test_two_process_distillation_with_the_teacher_outputs_computed_once(toy_recipe, write_recipe, tmp_path):
    """No noisy copies: each process keeps the teacher's outputs for every training text and looks its own rows
    up by index, whichever shard of the shuffled batches it reads."""
    toy_recipe["stages"].append(distill_stage(student={"num_layers": 1}, hidden_mse_weight=1.0, epochs=4))
    launch_two_processes(write_recipe(toy_recipe), tmp_path)
    distill = json.loads((tmp_path / "run" / "manifest.json").read_text())["stages"]["distill"]
    assert distill["status"] == "done", distill.get("error")
    assert distill["info"]["num_processes"] == 2 and distill["info"]["teacher_cache"]["cached"]
    assert distill["evaluation"]["accuracy"] >= 0.8, distill["evaluation"]


def test_base_chinese_recipe_validates_offline(tmp_path):
    """The users' base-size recipe names a Hub teacher (not fetched while validating) and reads their TSV format
    from the shipped samples."""
    from toolkit.data import prepare_data

    root = Path(__file__).resolve().parents[1]
    recipe = load_recipe(root / "recipes" / "base-chinese.yaml")
    assert recipe.model.name == "bert-base-chinese"
    assert [s.type for s in recipe.stages] == ["train", "prune", "distill"]
    data = prepare_data(recipe.data, tmp_path)
    assert data.label_names == ["negative", "positive"]
    assert set(data.labels("train")) == {0, 1} and "电影" in data.texts("train")[0]


def test_base_mpnet_recipe_validates_or_says_which_script_fetches_its_teacher():
    """recipes/base-mpnet.yaml reads its 12-layer teacher from models/ (scripts/fetch_mpnet_base.sh puts it there):
    with the folder it validates as a 12 -> 3 distillation with unlabelled texts; without it the error names the
    key and the folder, and the recipe's first line names the script."""
    root = Path(__file__).resolve().parents[1]
    path = root / "recipes" / "base-mpnet.yaml"
    assert "bash scripts/fetch_mpnet_base.sh" in path.read_text().splitlines()[0]
    teacher = root / "models" / "all-mpnet-base-v2"
    if not (teacher / "config.json").is_file():
        with pytest.raises(RecipeError, match=r"model\.name.*models/all-mpnet-base-v2"):
            load_recipe(path)
        return
    recipe = load_recipe(path)
    distill = next(s for s in recipe.stages if s.type == "distill")
    assert recipe.model.name == str(teacher) and distill.student.layers == [0, 1, 2]
    assert distill.unlabelled is not None and distill.unlabelled.format == "csv"
    assert distill.check_shape({"model_type": "mpnet", "num_hidden_layers": 12})["num_hidden_layers"] == 3


def unlabelled_file(path: Path, recipe: dict) -> tuple[Path, list[str]]:
    """A JSONL corpus: new toy texts, plus a copy of every text the recipe's data file holds (train, validation
    and test texts alike), a duplicate and a blank one."""
    from conftest import toy_examples

    labelled = [line.split("\t")[1] for line in Path(recipe["data"]["train"]).read_text().splitlines()[1:]]
    fresh = [text for text, _ in toy_examples(400, seed=7) if text not in set(labelled)][:60]
    rows = [*fresh, *labelled, fresh[0], " "]
    path.write_text("".join(json.dumps({"review": t, "stars": 5}) + "\n" for t in rows), encoding="utf-8")
    return path, fresh


def test_unlabelled_texts_join_the_transfer_set_without_any_split_text(toy_recipe, write_recipe, tmp_path):
    """Teacher-labelled extra texts: every text a split holds is left out (a test text would leak), duplicates
    and blanks too; the hard-label loss skips them; the manifest says what was read, dropped and seen."""
    corpus, fresh = unlabelled_file(tmp_path / "corpus.jsonl", toy_recipe)
    unlabelled = {"path": corpus.name, "text_column": "review"}
    toy_recipe["stages"].append(
        distill_stage(
            student={"num_layers": 1},
            hard_label_weight=0.5,
            epochs=2,
            unlabelled=unlabelled,
            augment={"copies": "auto"},
        )
    )
    manifest = run_recipe(load_recipe(write_recipe(toy_recipe)))
    entry = manifest.stage("distill")
    assert entry["status"] == "done", entry.get("error")
    info = entry["info"]
    counts = {k: v for k, v in info["unlabelled"].items() if k != "path"}
    assert counts == {
        "read": 240 + len(fresh) + 2,
        "empty": 1,
        "duplicates": 1,
        "in_train": 240 - 36 - 60,
        "in_validation": 36,
        "in_test": 60,
        "used": len(fresh),
    }, counts
    assert info["transfer_set"] == {"labelled": 144, "unlabelled": len(fresh)}
    # copies: auto on 204 texts: round(20,000 / 204) - 1 = 97 copies, capped at 8.
    assert info["augment_copies"] == 8
    assert info["texts_seen"] == (144 + len(fresh)) * info["epochs_run"] * 9


def test_unlabelled_max_texts_draws_a_seeded_sample_and_the_file_is_fingerprinted(toy_recipe, write_recipe, tmp_path):
    from toolkit.data import PreparedData, Row, unseen_texts

    data = PreparedData(tmp_path / "none", ["negative", "positive"], "")
    data.texts = lambda split: {"train": ["a b"], "validation": [" c d "], "test": ["e f"]}[split]
    rows = [Row(f"f:{i}", t, None) for i, t in enumerate(["c d", "a b", "x1", "x2", "x3", "x4", "e f", "x5"])]
    first, counts = unseen_texts(data, iter(rows), "text", 3, seed=0)
    again, _ = unseen_texts(data, iter(rows), "text", 3, seed=0)
    assert first == again and len(first) == 3 and set(first) < {"x1", "x2", "x3", "x4", "x5"}
    assert first == sorted(first)  # kept in file order
    assert counts["used"] == 3 and counts["in_validation"] == counts["in_train"] == counts["in_test"] == 1

    corpus, _ = unlabelled_file(tmp_path / "corpus.jsonl", toy_recipe)
    toy_recipe["stages"].append(
        distill_stage(student={"num_layers": 1}, epochs=1, unlabelled={"path": corpus.name, "text_column": "review"})
    )
    recipe = write_recipe(toy_recipe)
    run_recipe(load_recipe(recipe))
    with corpus.open("a", encoding="utf-8") as stream:
        stream.write(json.dumps({"review": "a brand new text"}) + "\n")
    manifest = run_recipe(load_recipe(recipe))
    assert manifest.stage("train")["status"] == "done"
    info = manifest.stage("distill")["info"]
    assert info["unlabelled"]["used"] == 61  # re-ran on the edited file
    assert info["teacher_cache"]["cached"] and info["teacher_cache"]["texts"] == 144 + 61


@pytest.mark.parametrize(
    ("unlabelled", "message"),
    [
        ({"path": "missing.txt"}, "unlabelled.path: 'missing.txt' not found"),
        ({"path": "corpus.dat"}, "cannot tell the format"),
        ({"path": "corpus.dat", "format": "xml"}, "format: Input should be 'auto', 'text', 'tsv', 'csv' or 'jsonl'"),
    ],
)
def test_bad_unlabelled_options_rejected_at_validation(toy_recipe, write_recipe, tmp_path, unlabelled, message):
    (tmp_path / "corpus.dat").write_text("one text\n")
    toy_recipe["stages"].append({"type": "distill", "student": {"num_layers": 1}, "unlabelled": unlabelled})
    with pytest.raises(RecipeError) as err:
        load_recipe(write_recipe(toy_recipe))
    assert message in str(err.value), str(err.value)


def test_unlabelled_texts_need_a_teacher_loss_and_a_named_column(toy_recipe, write_recipe, tmp_path):
    (tmp_path / "corpus.txt").write_text("one text\n")
    stage = {"type": "distill", "student": {"num_layers": 1}, "kd_weight": 0, "hard_label_weight": 1.0}
    toy_recipe["stages"].append({**stage, "unlabelled": {"path": "corpus.txt"}})
    with pytest.raises(RecipeError, match="every teacher loss weight is 0; set kd_weight"):
        load_recipe(write_recipe(toy_recipe))

    corpus, _ = unlabelled_file(tmp_path / "corpus.jsonl", toy_recipe)
    toy_recipe["stages"][-1] = distill_stage(student={"num_layers": 1}, epochs=1, unlabelled={"path": corpus.name})
    with pytest.raises(StageError) as failed:
        run_recipe(load_recipe(write_recipe(toy_recipe)))
    error = str(failed.value)
    assert f"{corpus}:1: no key 'text'" in error and "set distill.unlabelled.text_column" in error, error


def test_cached_teacher_outputs_are_the_live_ones_for_any_batch(tiny_model):
    """The cache is filled in length-sorted batches of its own; a training batch (other rows, other padding)
    must get what the teacher computes live for it: logits to float rounding, hidden states to FP16."""
    import torch
    from conftest import toy_examples
    from datasets import Dataset
    from transformers import AutoTokenizer

    from toolkit.config import DistillConfig
    from toolkit.distillation import TeacherCache, load_teacher, teacher_cache
    from toolkit.training import make_dataloaders

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    texts = [text for text, _ in toy_examples(40)]
    texts = [" ".join([t] * (1 + i % 3)) for i, t in enumerate(texts)]  # lengths 7 to 21 tokens
    encoded = Dataset.from_dict({"text": texts, "labels": [i % 2 for i in range(40)]}).map(
        lambda b: tokenizer(b["text"], truncation=True, max_length=32), batched=True, remove_columns=["text"]
    )
    split = {"train": encoded.add_column("row", range(40)), "validation": encoded}
    cfg = DistillConfig(type="distill", student={"num_layers": 1}, hidden_mse_weight=1.0, batch_size=8)
    train_dl, _ = make_dataloaders(split, tokenizer, cfg)
    teacher = load_teacher(tiny_model, cfg)
    cache, info = teacher_cache(cfg, teacher, train_dl, [0, 1], "cpu")
    assert isinstance(cache, TeacherCache) and info["cached"] and info["texts"] == 40
    for batch in train_dl:
        inputs = {k: v for k, v in batch.items() if k not in ("labels", "row")}
        with torch.no_grad():
            live = teacher(**inputs, output_hidden_states=True)
        kept = cache.outputs(batch["row"], inputs["attention_mask"])
        torch.testing.assert_close(kept.logits, live.logits, atol=1e-5, rtol=0)
        mask = inputs["attention_mask"].bool()
        for layer in (1, 2):
            torch.testing.assert_close(
                kept.hidden_states[layer][mask], live.hidden_states[layer][mask], atol=4e-3, rtol=1e-3
            )
            assert not kept.hidden_states[layer][~mask].any()

    augmented = cfg.model_copy(update={"augment": {"copies": 1}})
    assert teacher_cache(augmented, teacher, train_dl, [0, 1], "cpu") == (
        None,
        {"cached": False, "why": "noisy copies are new at every step"},
    )
