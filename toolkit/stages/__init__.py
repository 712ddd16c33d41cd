"""The explicit registry from recipe stage types to their option model and function.

Stage modules keep heavy imports (torch, transformers, onnxruntime) inside their functions so that
validating a recipe and `toolkit --help` stay instant. `distributed` stages run on every process under
`accelerate launch`; the others run on the main process while the rest wait. `after_selection` stages run
once every model stage is done and a candidate is selected, whatever their place in the recipe.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Union

from pydantic import Field

from toolkit.stages import distill, export, optimize, package, prune, push, quantize, train
from toolkit.stages.base import Artifact, StageBase, StageContext, StageResult


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
    "train": Stage(train.TrainConfig, train.run, distributed=True),
    "prune": Stage(prune.PruneConfig, prune.run, distributed=True),
    "distill": Stage(distill.DistillConfig, distill.run, distributed=True),
    "export": Stage(export.ExportConfig, export.run),
    "optimize": Stage(optimize.OptimizeConfig, optimize.run),
    "quantize": Stage(quantize.QuantizeConfig, quantize.run),
    "package": Stage(package.PackageConfig, package.run, after_selection=True, still_there=package.still_stored),
    "push": Stage(push.PushConfig, push.run, after_selection=True),
}

_configs = tuple(stage.config for stage in REGISTRY.values())
# A tagged union: pydantic picks the option model by `type` and names the allowed types when it is wrong.
StageConfig = (
    Annotated[Union[_configs], Field(discriminator="type")] if len(_configs) > 1 else _configs[0]  # noqa: UP007
)

__all__ = ["REGISTRY", "Artifact", "Stage", "StageBase", "StageConfig", "StageContext", "StageResult"]
