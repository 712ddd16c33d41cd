"""The recipe: one YAML file, validated into the typed `Recipe` (`toolkit.config`) before any work starts.

Every model forbids unknown keys; an invalid recipe is one `RecipeError` whose lines each name the key path, the
bad value and what is allowed.
"""

from __future__ import annotations

import typing
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from toolkit.config import STAGE_CONFIGS, Recipe
from toolkit.errors import ToolkitError


class RecipeError(ToolkitError):
    """An invalid recipe: `problems` holds one line per problem, each naming the key path."""

    def __init__(self, path: Path | str, problems: list[str]):
        self.path = path
        self.problems = problems
        super().__init__(f"{path}: invalid recipe\n" + "\n".join(f"  {p}" for p in problems))


def load_recipe(path: str | Path) -> Recipe:
    path = Path(path)
    if not path.is_file():
        raise RecipeError(path, [f"recipe file not found: {path}"])
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8-sig"))
    except yaml.YAMLError as exc:
        raise RecipeError(path, [f"not valid YAML: {exc}"]) from None
    return parse_recipe(raw, path.resolve().parent, source=path)


def parse_recipe(raw: Any, base_dir: Path, source: Path | str = "<recipe>") -> Recipe:
    if not isinstance(raw, dict):
        raise RecipeError(source, ["the recipe must be a mapping of keys (name, data, model, stages, ...)"])
    try:
        return Recipe.model_validate(raw, context={"base_dir": base_dir})
    except ValidationError as exc:
        raise RecipeError(source, [_describe(err, raw) for err in exc.errors()]) from None


def _describe(err: dict, raw: dict) -> str:
    loc = _strip_stage_tag(tuple(err["loc"]))
    where = _key_path(loc)
    msg = err["msg"].removeprefix("Value error, ")
    if err["type"] == "extra_forbidden":
        allowed = _allowed_keys(loc[:-1], raw)
        hint = f"; allowed keys: {', '.join(allowed)}" if allowed else ""
        return f"{where}: unknown key{hint}"
    if err["type"] == "missing":
        return f"{where}: required key is missing"
    shown = err.get("input")
    if isinstance(shown, (str, int, float, bool)) and err["type"] != "union_tag_invalid":
        return f"{where}: {msg} (got {shown!r})"
    return f"{where}: {msg}"


def _strip_stage_tag(loc: tuple) -> tuple:
    """pydantic puts the union tag in the path (stages.0.train.epochs); users wrote stages[0].epochs."""
    if len(loc) > 2 and loc[0] == "stages" and isinstance(loc[1], int) and loc[2] in STAGE_CONFIGS:
        return loc[:2] + loc[3:]
    return loc


def _key_path(loc: tuple) -> str:
    parts: list[str] = []
    for item in loc:
        if isinstance(item, int):
            parts.append(f"[{item}]")
        else:
            parts.append(("." if parts else "") + str(item))
    return "".join(parts) or "(top level)"


def _allowed_keys(loc: tuple, raw: dict) -> list[str]:
    """Walk the model classes along `loc` to list the keys allowed there (a stage's model comes from its type)."""
    model: Any = Recipe
    if len(loc) >= 2 and loc[0] == "stages":
        try:
            model = STAGE_CONFIGS[raw["stages"][loc[1]]["type"]]
        except (KeyError, IndexError, TypeError):
            return []
        loc = loc[2:]
    for item in loc:
        field = model.model_fields.get(item) if isinstance(item, str) else None
        annotation = getattr(field, "annotation", None)
        # `X | None` (an optional section such as distill's `augment`): the model inside.
        members = [annotation, *typing.get_args(annotation)]
        found = [m for m in members if isinstance(m, type) and issubclass(m, BaseModel)]
        if not found:
            return []
        model = found[0]
    return list(model.model_fields)


__all__ = ["Recipe", "RecipeError", "load_recipe", "parse_recipe"]
