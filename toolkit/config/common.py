"""What every option model shares: unknown keys are errors, paths resolve against the recipe's folder (it comes
in through pydantic's validation context), and the parity gate that several stages carry."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo

from toolkit.sources import SourceError, resolve_model

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


def local_model_shape(name: str) -> dict[str, Any] | None:
    """A model's `config.json` when it is a local folder (None for a Hub id: nothing to read offline)."""
    config = Path(name) / "config.json"
    if not config.is_file():
        return None
    try:
        return json.loads(config.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


class ParityGate(Strict):
    """How closely a stage's model must follow the model it came from before later stages may build on it."""

    min_agreement: float = Field(
        0.999, ge=0, le=1, description="Share of evaluation texts whose predicted class matches the source model's."
    )
    max_abs_diff: float | None = Field(
        None, gt=0, description="Largest allowed absolute logit difference on any text; null: not checked."
    )
