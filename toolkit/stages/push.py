"""`push`: upload the selected model and its model card to the Hugging Face Hub (optional, after selection).
The token comes from HF_TOKEN or the stored login, never from the recipe."""

from __future__ import annotations

from toolkit.config import PushConfig
from toolkit.stages.base import StageContext, StageResult


def run(cfg: PushConfig, ctx: StageContext) -> StageResult:
    from toolkit.hub import plan_upload, push

    if ctx.selection is None:
        raise ValueError("push runs after selection; it was given no selected model")
    upload = plan_upload(ctx.selection.manifest, cfg.repo_id)
    url = push(upload, cfg.private)
    return StageResult(None, {"repo_id": cfg.repo_id, "commit": url, "files": [n for n, _ in upload.files]})
