"""Recipe validation: valid recipes load into typed models; invalid ones name the key, the value and what is allowed."""

from __future__ import annotations

from pathlib import Path

import pytest

from toolkit.recipe import RecipeError, load_recipe, parse_recipe
from toolkit.stages.train import TrainConfig

ROOT = Path(__file__).resolve().parents[1]


def problems(raw: dict, base: Path) -> list[str]:
    with pytest.raises(RecipeError) as info:
        parse_recipe(raw, base)
    return info.value.problems


@pytest.mark.parametrize("name", ["full.yaml", "ci.yaml"])
def test_shipped_recipes_are_valid(name):
    recipe = load_recipe(ROOT / "recipes" / name)
    assert recipe.stages[0].type == "train"
    assert Path(recipe.model.name, "config.json").is_file()  # package: reference resolved to the installed folder
    assert Path(recipe.data.train).is_file()


def test_typed_objects_and_paths_relative_to_recipe(toy_recipe, write_recipe, tmp_path):
    toy_recipe["data"]["train"] = "train.tsv"  # relative to the recipe file, not the working directory
    recipe = load_recipe(write_recipe(toy_recipe))
    assert isinstance(recipe.stages[0], TrainConfig)
    assert recipe.stages[0].name == "train"
    assert recipe.data.format == "tsv"
    assert recipe.data.train == str(tmp_path / "train.tsv")
    assert recipe.run_dir == tmp_path / "run"


def test_unknown_key_names_path_and_allowed_keys(toy_recipe, tmp_path):
    toy_recipe["stages"][0]["learning_rat"] = 0.1
    toy_recipe["data"]["colour"] = "red"
    found = problems(toy_recipe, tmp_path)
    stage = next(p for p in found if p.startswith("stages[0].learning_rat"))
    assert "unknown key" in stage and "learning_rate" in stage and "epochs" in stage
    data = next(p for p in found if p.startswith("data.colour"))
    assert "text_column" in data


def test_bad_values_name_the_allowed_values(toy_recipe, tmp_path):
    toy_recipe["stages"][0]["mixed_precision"] = "fp8"
    toy_recipe["stages"][0]["epochs"] = 0
    toy_recipe["device"] = "tpu"
    found = "\n".join(problems(toy_recipe, tmp_path))
    assert "stages[0].mixed_precision" in found and "'auto', 'no', 'fp16' or 'bf16'" in found
    assert "(got 'fp8')" in found
    assert "stages[0].epochs: Input should be greater than 0 (got 0)" in found
    assert "device: Input should be 'auto', 'cpu' or 'cuda' (got 'tpu')" in found


def test_unknown_stage_type_lists_the_types(toy_recipe, tmp_path):
    toy_recipe["stages"] = [{"type": "shrink"}]
    (found,) = problems(toy_recipe, tmp_path)
    assert found.startswith("stages[0]") and "'train'" in found


def test_missing_keys_and_files(toy_recipe, tmp_path):
    del toy_recipe["model"]
    toy_recipe["data"]["train"] = "nowhere.tsv"
    found = "\n".join(problems(toy_recipe, tmp_path))
    assert "model: required key is missing" in found
    assert "nowhere.tsv" in found and "not found" in found


def test_model_reference_forms(toy_recipe, tmp_path):
    toy_recipe["model"]["name"] = "./no/such/folder"
    assert "neither an existing folder" in problems(toy_recipe, tmp_path)[0]
    toy_recipe["model"]["name"] = "package:no_such_package_xyz/model"
    assert "not installed" in problems(toy_recipe, tmp_path)[0]
    toy_recipe["model"]["name"] = "bert-base-uncased"  # a Hub id stays a Hub id (loaded at run time)
    assert parse_recipe(toy_recipe, tmp_path).model.name == "bert-base-uncased"


def test_duplicate_stage_names_and_empty_stages(toy_recipe, tmp_path):
    toy_recipe["stages"] = [{"type": "train"}, {"type": "train"}]
    assert "stage names must be unique" in problems(toy_recipe, tmp_path)[0]
    toy_recipe["stages"] = []
    assert problems(toy_recipe, tmp_path)[0].startswith("stages:")


def test_invalid_yaml_and_non_mapping(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed\n")
    with pytest.raises(RecipeError, match="not valid YAML"):
        load_recipe(bad)
    bad.write_text("- just\n- a list\n")
    with pytest.raises(RecipeError, match="must be a mapping"):
        load_recipe(bad)


@pytest.mark.parametrize(
    ("teacher", "message"),
    [
        ("nosuchstage", r"teacher 'nosuchstage' is not an earlier enabled stage; it must name an earlier enabled"),
        ("later", r"teacher 'later' is not an earlier enabled stage"),
        ("off", r"teacher 'off' is not an earlier enabled stage"),
        ("export", r"teacher 'export' makes no PyTorch model; .*\(here: train\)"),
    ],
)
def test_distill_teacher_must_name_an_earlier_enabled_model_stage(tmp_path, teacher, message):
    raw = {
        "name": "t",
        "data": {"train": "train.tsv"},
        "model": {"name": "org/model"},
        "stages": [
            {"type": "train"},
            {"type": "train", "name": "off", "enabled": False},
            {"type": "export"},
            {"type": "distill", "teacher": teacher, "student": {"num_layers": 1}},
            {"type": "train", "name": "later"},
        ],
    }
    (tmp_path / "train.tsv").write_text("index\tsentence\tlabel\n0\ta\t1\n")
    with pytest.raises(RecipeError, match=message):
        parse_recipe(raw, tmp_path)
    raw["stages"][3]["teacher"] = "train"
    assert parse_recipe(raw, tmp_path).stages[3].teacher == "train"
