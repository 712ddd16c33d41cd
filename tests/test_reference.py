"""The recipe reference is generated from the option models and every option says what it does."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from toolkit.cli import app
from toolkit.config import STAGE_CONFIGS, Recipe
from toolkit.config.reference import _models_in, markdown

ROOT = Path(__file__).resolve().parents[1]


def all_models():
    todo, seen = [Recipe, *STAGE_CONFIGS.values()], []
    while todo:
        model = todo.pop()
        if model in seen:
            continue
        seen.append(model)
        for field in model.model_fields.values():
            todo.extend(_models_in(field.annotation))
    return seen


def test_docs_recipe_reference_is_generated_from_the_models():
    assert (ROOT / "docs" / "recipe.md").read_text() == markdown(), (
        "docs/recipe.md is out of date: run `toolkit schema --markdown > docs/recipe.md`"
    )


def test_every_option_has_a_description():
    missing = [
        f"{model.__name__}.{key}"
        for model in all_models()
        for key, field in model.model_fields.items()
        if not field.description and key != "type"
    ]
    assert missing == []


def test_schema_command_prints_a_json_schema_with_the_descriptions():
    result = CliRunner().invoke(app, ["schema"])
    assert result.exit_code == 0, result.output
    schema = json.loads(result.output)
    assert schema["title"] == "Recipe"
    assert "learning rate" in json.dumps(schema["$defs"]["TrainConfig"]).lower()
    markdown_out = CliRunner().invoke(app, ["schema", "--markdown"]).output
    assert "### stage `quantize`" in markdown_out and "`instruction_set`" in markdown_out
