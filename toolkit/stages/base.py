"""What every stage shares: its option model's base, the model artifacts that flow between stages, and the
context a stage runs in. A stage is a function `run(cfg, ctx) -> StageResult` that reads `ctx.source` and
writes only into `ctx.out_dir` (folder in -> folder out); the pipeline makes that write atomic."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

if TYPE_CHECKING:
    from toolkit.data import PreparedData
    from toolkit.recipe import Recipe


class StageBase(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: str
    # Unique within the recipe; defaults to the type. Names the stage's folder and its manifest entry.
    name: str = Field("", pattern=r"^([A-Za-z0-9][A-Za-z0-9_.-]*)?$")
    enabled: bool = True

    @model_validator(mode="after")
    def _default_name(self):
        if not self.name:
            self.name = self.type
        return self

    def check_shape(self, shape: dict[str, Any] | None) -> dict[str, Any] | None:
        """Check this stage's options against the shape of the model it will receive (the recipe model's
        `config.json` fields, passed from stage to stage; None when unknown, e.g. a Hub model) and return the
        shape it hands on. Raise ValueError for options the shape rules out. Most stages keep the shape."""
        return shape


@dataclass(frozen=True)
class Artifact:
    """A model on disk. `format` tells loaders what `path` holds: a transformers folder or an ONNX folder."""

    path: Path | str  # a str only for the recipe's own model, which may be a Hub id
    format: Literal["pytorch", "onnx"]
    stage: str

    def to_json(self) -> dict[str, str]:
        return {"path": str(self.path), "format": self.format, "stage": self.stage}

    @classmethod
    def from_json(cls, data: dict[str, str]) -> Artifact:
        path = Path(data["path"]) if Path(data["path"]).is_absolute() else data["path"]
        return cls(path, data["format"], data["stage"])  # type: ignore[arg-type]


@dataclass
class StageContext:
    recipe: Recipe
    run_dir: Path
    out_dir: Path
    data: PreparedData
    # The model this stage starts from: the latest model any earlier stage produced (or the recipe's model).
    source: Artifact
    # Every earlier stage's model, by stage name, in recipe order.
    artifacts: dict[str, Artifact] = field(default_factory=dict)
    # The chosen candidate; set only for stages that run after selection (packaging, pushing).
    selected: Artifact | None = None

    def latest(self, fmt: str) -> Artifact | None:
        """The newest earlier artifact of a format (an ONNX stage after a non-ONNX one needs the PyTorch model)."""
        found = [a for a in self.artifacts.values() if a.format == fmt]
        return found[-1] if found else None


@dataclass
class StageResult:
    # None for stages that produce no model (packaging, pushing): the current model carries on.
    artifact: Artifact | None
    # Stage-specific facts for the manifest (training curve, kept heads, fusion counts...). JSON-serialisable.
    info: dict[str, Any] = field(default_factory=dict)
    # The model the stage really started from when it is not `ctx.source` (an export after an ONNX stage reads
    # the newest PyTorch model); parity is measured against it.
    source: Artifact | None = None
