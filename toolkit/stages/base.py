"""The stage contract. A stage is a function `run(cfg, ctx) -> StageResult` that reads `ctx.source` and writes
only into `ctx.out_dir` (folder in -> folder out); the pipeline makes that write atomic. The context holds what
stages use, not the recipe: the device, the token length, the model reference, the recipe's name and
fingerprint, and for stages after selection the selection record."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from toolkit.config import StageBase
from toolkit.manifest import Artifact

if TYPE_CHECKING:
    from toolkit.data import PreparedData
    from toolkit.manifest import Manifest


@dataclass(frozen=True)
class ModelRef:
    """The recipe's pretrained model: a local folder or a Hub id, with the Hub revision to load."""

    name: str
    revision: str | None = None


@dataclass(frozen=True)
class Selection:
    """What stages after selection get: the chosen model, why it was chosen, its manifest entry (figures,
    fingerprint), and the run's record as it stands (a model card reports every stage)."""

    artifact: Artifact
    reason: str
    entry: dict[str, Any]
    manifest: Manifest


@dataclass
class StageContext:
    run_dir: Path
    out_dir: Path
    # The model this stage starts from: the latest model any earlier stage produced (or the recipe's model).
    source: Artifact
    data: PreparedData | None = None
    # Every earlier stage's model, by stage name, in recipe order.
    artifacts: dict[str, Artifact] = field(default_factory=dict)
    device: str = "cpu"  # the recipe's device: auto, cpu or cuda
    max_length: int = 128  # tokens per text, everywhere
    model: ModelRef | None = None
    recipe_name: str = ""
    recipe_fingerprint: str = ""
    # Set only for stages that run after selection (packaging, pushing).
    selection: Selection | None = None

    def latest(self, fmt: str) -> Artifact | None:
        """The newest earlier artifact of a format (an ONNX stage after a non-ONNX one needs the PyTorch model)."""
        found = [a for a in self.artifacts.values() if a.format == fmt]
        return found[-1] if found else None

    def revision_of(self, artifact: Artifact) -> str | None:
        """The Hub revision to load `artifact` at: the recipe's, for its own model; none for a stage's folder."""
        return self.model.revision if self.model is not None and artifact.stage == "pretrained" else None


@dataclass
class StageResult:
    # None for stages that produce no model (packaging, pushing): the current model carries on.
    artifact: Artifact | None
    # Stage-specific facts for the manifest (training curve, kept heads, fusion counts...). JSON-serialisable.
    info: dict[str, Any] = field(default_factory=dict)
    # The model the stage really started from when it is not `ctx.source` (an export after an ONNX stage reads
    # the newest PyTorch model); parity is measured against it.
    source: Artifact | None = None


__all__ = ["Artifact", "ModelRef", "Selection", "StageBase", "StageContext", "StageResult"]
