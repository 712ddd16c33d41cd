"""`package`: save the selected candidate into the BentoML model store, so `bentoml serve` and a bento built
later find it. The stored folder is self-contained for the serving runtime: the model files (ONNX or
PyTorch), the tokenizer and `toolkit.json` (labels, max length, format, the stage's figures, the recipe)."""

from __future__ import annotations

import re

from toolkit.config import PackageConfig
from toolkit.runtime import resolve_device
from toolkit.stages.base import Artifact, StageContext, StageResult
from toolkit.stages.tuning import tune_onnx


def bento_name(cfg: PackageConfig, recipe_name: str) -> str:
    name = cfg.model_name or re.sub(r"[^a-z0-9_.-]", "-", recipe_name.lower()).strip("-.")
    return name or "toolkit-model"


def run(cfg: PackageConfig, ctx: StageContext) -> StageResult:
    selection = ctx.selection
    if selection is None:
        raise ValueError("package runs after selection; it was given no selected model")
    meta = package_metadata(ctx)
    info = {"format": selection.artifact.format, "stage": selection.artifact.stage}
    if cfg.tune_runtime and selection.artifact.format == "onnx" and resolve_device(ctx.device, "onnx") == "cpu":
        tuned = tune_onnx(selection.artifact, ctx.max_length, ctx.data.texts("validation"))
        meta["runtime"] = {k: tuned[k] for k in ("choice", "cpu", "cores", "date")}
        info["runtime_tuning"] = tuned
    info["tag"] = save_to_store(bento_name(cfg, ctx.recipe_name), selection.artifact, meta)
    return StageResult(None, info)


def still_stored(info: dict) -> bool:
    """A re-run may skip packaging only if the stored model has not been deleted since."""
    import bentoml

    try:
        bentoml.models.get(info["tag"])
    except (bentoml.exceptions.NotFound, KeyError):
        return False
    return True


def save_to_store(name: str, artifact: Artifact, meta: dict) -> str:
    """A new version of `name` in the BentoML model store; the service finds it by the `toolkit` label."""
    import bentoml

    from toolkit.serving.bundle import write_bundle

    labels = {"toolkit": "classifier", "recipe": meta["recipe"], "format": artifact.format, "stage": artifact.stage}
    with bentoml.models.create(name, labels=labels, metadata=meta, module="toolkit.serving") as model:
        write_bundle(artifact, model.path, meta)
    return str(model.tag)


def package_metadata(ctx: StageContext) -> dict:
    selection = ctx.selection
    return {
        "format": selection.artifact.format,
        "stage": selection.artifact.stage,
        "labels": list(ctx.data.label_names),
        "max_length": ctx.max_length,
        "recipe": ctx.recipe_name,
        "recipe_fingerprint": ctx.recipe_fingerprint,
        "stage_fingerprint": selection.entry.get("fingerprint"),
        "evaluation": selection.entry.get("evaluation") or {},
        "selection_reason": selection.reason,
    }
