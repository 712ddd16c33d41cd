"""`push`: upload the selected model and its model card to the Hugging Face Hub (optional, after selection).
The token comes from HF_TOKEN or the stored login, never from the recipe."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from toolkit.hub import REPO_ID
from toolkit.stages.base import StageBase, StageContext, StageResult


class PushConfig(StageBase):
    type: Literal["push"]
    repo_id: str = Field(pattern=REPO_ID)
    private: bool = False


def run(cfg: PushConfig, ctx: StageContext) -> StageResult:
    from toolkit.hub import plan_upload, push

    upload = plan_upload(ctx.run_dir, cfg.repo_id)
    url = push(upload, cfg.private)
    return StageResult(None, {"repo_id": cfg.repo_id, "commit": url, "files": [n for n, _ in upload.files]})
