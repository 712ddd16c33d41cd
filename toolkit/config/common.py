"""What every option model shares: unknown keys are errors, paths resolve against the recipe's folder (it comes
in through pydantic's validation context), and the parity gate that several stages carry."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo

from toolkit.sources import PRUNED_HEADS_KEY, SourceError, resolve_local, resolve_model

# A Hub repository id, `user/name`.
REPO_ID = r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$"


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


def base_dir(info: ValidationInfo) -> Path:
    return Path((info.context or {}).get("base_dir", "."))


def model_reference(value: str, info: ValidationInfo) -> str:
    """A local folder (made absolute), a `package:` folder, or a Hub id; a ValueError pydantic reports by key."""
    try:
        return resolve_model(value, base_dir(info))
    except SourceError as exc:
        raise ValueError(str(exc)) from None


def existing_file(value: str, base: Path, key: str) -> Path:
    """A path relative to the recipe folder, or a `package:` file; a ValueError naming `key` when neither exists."""
    try:
        path = resolve_local(value, base)
    except SourceError as exc:
        raise ValueError(str(exc)) from None
    if path is None:
        raise ValueError(f"{key}: {value!r} not found (relative to the recipe folder {base})")
    return path


def local_model_shape(name: str) -> dict[str, Any] | None:
    """A model's `config.json` when it is a local folder (None for a Hub id: nothing to read offline), with the
    heads a toolkit folder holds as zeros counted as pruned (what toolkit's loader makes of it)."""
    shape = _local_json(Path(name) / "config.json")
    if shape and shape.get(PRUNED_HEADS_KEY):
        shape = {**shape, "pruned_heads": shape[PRUNED_HEADS_KEY]}
    return shape


def local_tokenizer_config(name: str) -> dict[str, Any] | None:
    """A model's `tokenizer_config.json` when it is a local folder (None for a Hub id or when there is none)."""
    return _local_json(Path(name) / "tokenizer_config.json")


def _local_json(file: Path) -> dict[str, Any] | None:
    if not file.is_file():
        return None
    try:
        found = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return found if isinstance(found, dict) else None


# Families whose embeddings number a text's positions from padding_idx + 1 (fairseq's RoBERTa and its heirs), so
# that many rows of the position table are never a token's.
OFFSET_POSITIONS = ("roberta", "xlm-roberta", "xlm-roberta-xl", "camembert", "mpnet", "roberta-prelayernorm",
                    "data2vec-text", "longformer", "ibert")  # fmt: skip


def position_limit(shape: dict[str, Any] | None) -> tuple[int, str] | None:
    """The most tokens a text may have in this model (its position table), and how that follows from its
    `config.json`; None when the shape is unknown or the model has no absolute position table (DeBERTa-v2/v3
    with `position_biased_input: false`)."""
    table = (shape or {}).get("max_position_embeddings")
    if not isinstance(table, int) or shape.get("position_biased_input") is False:
        return None
    family = shape.get("model_type")
    if family not in OFFSET_POSITIONS:
        return table, f"max_position_embeddings {table} in its config.json"
    offset = (shape.get("pad_token_id") if isinstance(shape.get("pad_token_id"), int) else 1) + 1
    return table - offset, (
        f"max_position_embeddings {table} in its config.json minus {offset}: a {family} model numbers positions "
        f"from padding_idx + 1 = {offset}"
    )


def check_max_length(max_length: int, shape: dict[str, Any] | None, whose: str) -> None:
    """A ValueError with the value and the limit when `whose` position table is shorter than `max_length` (the
    caller's place names `model.max_length`): an over-long text would fail every request batched with it."""
    limit = position_limit(shape)
    if limit is not None and max_length > limit[0]:
        raise ValueError(
            f"{max_length} tokens are more than {whose} has positions for ({limit[0]}: {limit[1]}); set "
            f"model.max_length to at most {limit[0]}"
        )


class ParityGate(Strict):
    """How closely a stage's model must follow the model it came from before later stages may build on it."""

    min_agreement: float = Field(
        0.999, ge=0, le=1, description="Share of evaluation texts whose predicted class matches the source model's."
    )
    max_abs_diff: float | None = Field(
        None, gt=0, description="Largest allowed absolute logit difference on any text; null: not checked."
    )
