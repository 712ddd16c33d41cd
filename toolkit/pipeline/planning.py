"""What a run does before it does anything: which stages may run or must be reused (`--only`, `--from`,
`--fresh`), and the fingerprints that decide whether an earlier result is still up to date.

A stage's fingerprint is its options plus its input's fingerprint, so changing one stage re-runs it and
everything after it, and nothing before.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from toolkit.config import Recipe, StageBase
from toolkit.errors import ToolkitError
from toolkit.manifest import Artifact, fingerprint
from toolkit.sources import file_sha256


class PlanError(ToolkitError, ValueError):
    """`--only`/`--from` asked for something the recipe or earlier results cannot give."""


@dataclass
class Plan:
    force: set[str]  # stages to run even when their earlier result is up to date
    run: set[str]  # stages allowed to run at all (the others must be reused)


def make_plan(recipe: Recipe, only: list[str] | None, from_: str | None, fresh: bool) -> Plan:
    enabled = [s.name for s in recipe.stages if s.enabled]
    names = [s.name for s in recipe.stages]
    for name in [*(only or []), *([from_] if from_ else [])]:
        if name not in names:
            raise PlanError(f"no stage named {name!r} in the recipe (stages: {', '.join(names)})")
        if name not in enabled:
            raise PlanError(f"stage {name!r} is disabled in the recipe (enabled: false)")
    if only and from_:
        raise PlanError("use --only or --from, not both")
    if only:
        return Plan(force=set(only), run=set(only))
    if from_:
        chosen = set(enabled[enabled.index(from_) :])
        return Plan(force=chosen, run=chosen)
    return Plan(force=set(enabled) if fresh else set(), run=set(enabled))


def pretrained_artifact(recipe: Recipe, data_fingerprint: str) -> tuple[Artifact, str]:
    """The recipe's own model, and the fingerprint the first stage chains on (model options and data)."""
    model = recipe.model
    return Artifact(model.name, "pytorch", "pretrained"), fingerprint(fingerprint(model.model_dump()), data_fingerprint)


def stage_fingerprint(cfg: StageBase, upstream: str) -> str:
    # Gate tolerances are judged after evaluation; changing them re-judges without re-running the stage.
    files = [file_sha256(Path(path)) for path in cfg.input_files()]
    return fingerprint(cfg.model_dump(exclude={"name", "enabled", "parity"}), upstream, *files)


def next_upstream(stage_fp: str, finished: str | None) -> str:
    """Chained on when the stage last ran, not only on its options: a stage run again (--only, a deleted folder)
    makes every later result stale."""
    return fingerprint(stage_fp, finished)


def after_selection_fingerprint(cfg: StageBase, chosen: str, made: dict) -> str:
    """The chosen model's identity, not the figures around it: re-measuring speed must not re-package."""
    return fingerprint(
        cfg.model_dump(exclude={"name", "enabled"}), chosen, made.get("fingerprint"), made.get("finished")
    )


def recipe_fingerprint(recipe: Recipe) -> str:
    return fingerprint(recipe.model_dump(mode="json"))
