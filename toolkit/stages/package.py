"""`package`: save the selected candidate into the BentoML model store, so `bentoml serve` and a bento built
later find it. The stored folder is self-contained for the serving runtime: the model files (ONNX or
PyTorch), the tokenizer and `toolkit.json` (labels, max length, format, the stage's figures, the recipe).

Before BentoML stores it, the written folder is checked for serving parity (`serving_parity.py`): the evaluation
split replayed through the service's path must get every text's evaluated class."""

from __future__ import annotations

import re
from collections.abc import Callable

from toolkit.config import PackageConfig
from toolkit.runtime import resolve_device
from toolkit.stages import serving_parity
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
    check = None
    if cfg.serving_parity:
        split = selection.entry["evaluation"]["split"]
        texts = ctx.data.texts(split)
        evaluated = serving_parity.evaluated_logits(ctx.run_dir, selection.artifact.stage, len(texts))

        def check(folder: str) -> None:
            info["serving_parity"] = serving_parity.check(folder, texts, evaluated, split, cfg.serving_parity_clients)

    info["tag"] = save_to_store(bento_name(cfg, ctx.recipe_name), selection.artifact, meta, check)
    return StageResult(None, info)


def still_stored(info: dict) -> bool:
    """A re-run may skip packaging only if the stored model has not been deleted since."""
    import bentoml

    try:
        bentoml.models.get(info["tag"])
    except (bentoml.exceptions.NotFound, KeyError):
        return False
    return True


def save_to_store(name: str, artifact: Artifact, meta: dict, check: Callable[[str], None] | None = None) -> str:
    """A new version of `name` in the BentoML model store; the service finds it by the `toolkit` label. `check`
    reads the written folder before it is stored; when it raises, nothing is stored."""
    import bentoml

    from toolkit.serving.bundle import write_bundle

    labels = {"toolkit": "classifier", "recipe": meta["recipe"], "format": artifact.format, "stage": artifact.stage}
    with bentoml.models.create(name, labels=labels, metadata=meta, module="toolkit.serving") as model:
        write_bundle(artifact, model.path, meta)
        if check is not None:
            # Checked before it is stored, not deleted afterwards: BentoML writes the model into a temporary
            # folder and copies that folder into the store only when this block ends without an error, so a
            # failed check leaves no moment in which `bentoml serve` could pick the model as the newest one, and
            # what was checked is byte for byte what is stored.
            check(model.path)
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
