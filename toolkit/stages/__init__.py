"""The explicit registry from recipe stage types to their option model and function.

Option models live in `toolkit.config` (validating a recipe imports no stage). Stage modules keep heavy imports
(torch, transformers, onnxruntime) inside their functions so `toolkit --help` stays instant. `distributed`
stages run on every process under `accelerate launch`; the others run on the main process while the rest
wait. `after_selection` stages run once every model stage is done and a candidate is selected, whatever their
place in the recipe.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from toolkit.config import STAGE_CONFIGS, StageBase
from toolkit.stages import distill, export, openvino, optimize, package, prune, push, quantize, train, trim_vocab
from toolkit.stages.base import Artifact, ModelRef, Selection, StageContext, StageResult


@dataclass(frozen=True)
class Stage:
    config: type[StageBase]
    run: Callable[[StageBase, StageContext], StageResult]
    distributed: bool = False
    # Runs after every model stage and the selection, on the selected model (packaging, pushing).
    after_selection: bool = False
    # For results kept outside the run folder (the model store): is an earlier result still there?
    still_there: Callable[[dict], bool] | None = None


REGISTRY: dict[str, Stage] = {
    "train": Stage(STAGE_CONFIGS["train"], train.run, distributed=True),
    "trim_vocab": Stage(STAGE_CONFIGS["trim_vocab"], trim_vocab.run),
    "prune": Stage(STAGE_CONFIGS["prune"], prune.run, distributed=True),
    "distill": Stage(STAGE_CONFIGS["distill"], distill.run, distributed=True),
    "export": Stage(STAGE_CONFIGS["export"], export.run),
    "optimize": Stage(STAGE_CONFIGS["optimize"], optimize.run),
    "quantize": Stage(STAGE_CONFIGS["quantize"], quantize.run),
    "openvino": Stage(STAGE_CONFIGS["openvino"], openvino.run),
    "package": Stage(STAGE_CONFIGS["package"], package.run, after_selection=True, still_there=package.still_stored),
    "push": Stage(STAGE_CONFIGS["push"], push.run, after_selection=True),
}
assert set(REGISTRY) == set(STAGE_CONFIGS), "every option model needs its stage function and vice versa"

__all__ = ["REGISTRY", "Artifact", "ModelRef", "Selection", "Stage", "StageBase", "StageContext", "StageResult"]
