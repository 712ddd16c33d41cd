"""`package`: save the selected candidate into the BentoML model store, so `bentoml serve` and a bento built
later find it. The stored folder is self-contained for the serving runtime: the model files (ONNX or
PyTorch), the tokenizer and `toolkit.json` (labels, max length, format, the stage's figures, the recipe)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from toolkit.stages.base import Artifact, StageBase, StageContext, StageResult

# BentoML tag names: lowercase letters, digits, `_`, `-` and `.`, starting with a letter or digit.
TAG_NAME = r"^[a-z0-9][a-z0-9_.-]*$"


class PackageConfig(StageBase):
    type: Literal["package"]
    # Name in the model store; defaults to the recipe's name (lowercased).
    model_name: str | None = Field(None, pattern=TAG_NAME, max_length=63)


def bento_name(cfg: PackageConfig, recipe_name: str) -> str:
    import re

    name = cfg.model_name or re.sub(r"[^a-z0-9_.-]", "-", recipe_name.lower()).strip("-.")
    return name or "toolkit-model"


def run(cfg: PackageConfig, ctx: StageContext) -> StageResult:
    from toolkit.manifest import Manifest

    selected = ctx.selected or ctx.source
    manifest = Manifest.load(ctx.run_dir)
    meta = package_metadata(ctx, manifest, selected)
    tag = save_to_store(bento_name(cfg, ctx.recipe.name), selected, meta)
    return StageResult(None, {"tag": tag, "format": selected.format, "stage": selected.stage})


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


def package_metadata(ctx: StageContext, manifest, selected: Artifact) -> dict:
    from toolkit.manifest import fingerprint

    entry = manifest.stage(selected.stage) or {}
    return {
        "format": selected.format,
        "stage": selected.stage,
        "labels": list(ctx.data.label_names),
        "max_length": ctx.recipe.model.max_length,
        "recipe": ctx.recipe.name,
        "recipe_fingerprint": fingerprint(ctx.recipe.model_dump(mode="json")),
        "stage_fingerprint": entry.get("fingerprint"),
        "evaluation": entry.get("evaluation") or {},
        "selection_reason": (manifest.data.get("selection") or {}).get("reason"),
    }
