"""The recipe reference, generated from the option models (their `Field(description=...)`): `toolkit schema
--markdown` prints it and docs/recipe.md is its output, checked by a test so it never drifts from the code."""

from __future__ import annotations

import json
import types
import typing
from typing import Any, Literal

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from toolkit.config.run import Recipe
from toolkit.config.stages import STAGE_CONFIGS, LoopOptions, StageBase

HEADER = """# Recipe reference

Generated from the option models by `toolkit schema --markdown > docs/recipe.md`; do not edit by hand. A recipe
is YAML; every section rejects unknown keys, and paths are relative to the recipe file. `toolkit schema` prints
the same as a JSON schema; `toolkit validate RECIPE` checks a recipe without running anything.
"""


def json_schema() -> dict[str, Any]:
    return Recipe.model_json_schema()


def markdown() -> str:
    sections: list[str] = [HEADER]
    seen: set[type] = set()
    _model_sections(Recipe, "recipe (top level)", sections, seen)
    sections.append("## Stages\n\nEach entry of `stages` has a `type`; the keys allowed depend on it.\n")
    for name, config in STAGE_CONFIGS.items():
        _model_sections(config, f"stage `{name}`", sections, seen, level="###")
    return "\n".join(sections).rstrip() + "\n"


def explain(options: BaseModel) -> list[str]:
    """One line per option of a validated section: its value (set in the recipe or the default) and what it does."""
    lines = []
    for key, field in _ordered(type(options)):
        value = getattr(options, key)
        shown = value.model_dump(mode="json") if isinstance(value, BaseModel) else value
        mark = "" if key in options.model_fields_set else " (default)"
        description = field.description or getattr(StageBase.model_fields.get(key), "description", "") or ""
        lines.append(f"{key}: {json.dumps(shown)}{mark}  # {description}")
    return lines


def _model_sections(model: type[BaseModel], title: str, out: list[str], seen: set, level: str = "##") -> None:
    nested: list[tuple[str, type[BaseModel]]] = []
    doc = " ".join((model.__doc__ or "").split()) if model.__doc__ and "pydantic" not in model.__doc__ else ""
    rows = ["| key | type | default | description |", "|---|---|---|---|"]
    for key, field in _ordered(model):
        for inner in _models_in(field.annotation):
            if inner not in seen and inner.__name__ != "StageBase":
                nested.append((key, inner))
        description = field.description or getattr(StageBase.model_fields.get(key), "description", "") or ""
        rows.append(f"| `{key}` | {_type(field.annotation)} | {_default(field)} | {_cell(description)} |")
    out.append(f"{level} {title}\n")
    if doc:
        out.append(doc + "\n")
    out.append("\n".join(rows) + "\n")
    for key, inner in nested:
        if inner in seen or issubclass(inner, tuple(STAGE_CONFIGS.values())):
            continue
        seen.add(inner)
        _model_sections(inner, f"{title.split(' (')[0]} → `{key}`", out, seen, level + "#" if len(level) < 4 else level)


def _ordered(model: type[BaseModel]) -> list[tuple[str, Any]]:
    """A stage's own keys first (type, name, enabled, its options), the shared training-loop options last."""
    fields = model.model_fields
    first = [k for k in ("type", "name", "enabled") if k in fields]
    loop = [k for k in LoopOptions.model_fields if k in fields and issubclass(model, StageBase)]
    rest = [k for k in fields if k not in first and k not in loop]
    return [(k, fields[k]) for k in [*first, *rest, *loop]]


def _models_in(annotation: Any) -> list[type[BaseModel]]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [m for arg in typing.get_args(annotation) for m in _models_in(arg)]


def _type(annotation: Any) -> str:
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is Literal:
        return " \\| ".join(f"`{json.dumps(a)}`" for a in args)
    if origin in (typing.Union, types.UnionType):
        return " \\| ".join(_type(a) for a in args)
    if origin is typing.Annotated:
        if typing.get_origin(args[0]) in (typing.Union, types.UnionType):
            return "a stage (see below)"
        return _type(args[0])
    if origin in (list, dict):
        return f"{origin.__name__} of " + ", ".join(_type(a) for a in args)
    if annotation is type(None):
        return "null"
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return "section"
    return getattr(annotation, "__name__", str(annotation)).replace("PositiveInt", "int > 0")


def _default(field) -> str:
    if field.is_required():
        return "**required**"
    value = field.default
    if value is PydanticUndefined:
        return "—"
    if isinstance(value, BaseModel):
        return "see section"
    return f"`{json.dumps(value)}`"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")
