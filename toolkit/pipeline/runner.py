"""Runs a recipe: data once, then each enabled model stage in order, each evaluated and gated, then the
selection, then the stages that work on the selected model; everything in the manifest.

Stages write into `<name>.partial/`, renamed to `<name>/` only on success: an interrupted stage leaves nothing
a re-run would trust. Under `accelerate launch` every process runs this; distributed stages (training) run on
all of them, the rest on the main process only (`Sync`).
"""

from __future__ import annotations

import logging
import shutil
import time

from toolkit import __version__
from toolkit.config import Recipe, StageBase
from toolkit.data import PreparedData, prepare_data
from toolkit.machine import environment
from toolkit.manifest import Artifact, Manifest, now
from toolkit.pipeline import planning
from toolkit.pipeline.errors import StageError
from toolkit.pipeline.judging import Judge
from toolkit.pipeline.planning import Plan, PlanError
from toolkit.pipeline.sync import Sync
from toolkit.stages import REGISTRY, ModelRef, Selection, StageContext, StageResult

log = logging.getLogger("toolkit")


class Runner:
    def __init__(self, recipe: Recipe, plan: Plan, sync: Sync):
        self.recipe, self.plan, self.sync = recipe, plan, sync
        self.run_dir = recipe.run_dir
        self.manifest = Manifest.load(self.run_dir, writable=sync.is_main)
        self.judge = Judge(recipe, self.manifest, sync, plan.force)
        self.ran: list[str] = []  # stages run (not reused) in this invocation
        self.recipe_fp = planning.recipe_fingerprint(recipe)

    def say(self, message: str, level: int = logging.INFO) -> None:
        if self.sync.is_main:
            log.log(level, message)

    def run(self) -> Manifest:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        with self.sync.main_process_first():
            data = prepare_data(self.recipe.data, self.run_dir)
        if self.sync.is_main:  # reading the splits starts Arrow's threads, which abort a helper process at exit
            self.manifest.record_run(__version__, self.recipe.model_dump(mode="json"), data, environment())
        source, artifacts = self._model_stages(data)
        selection = self._select(data)
        for cfg in self.recipe.stages:
            if cfg.enabled and REGISTRY[cfg.type].after_selection:
                made = self.manifest.stage(selection.artifact.stage) or {}
                stage_fp = planning.after_selection_fingerprint(cfg, selection.artifact.stage, made)
                self._run_or_reuse(cfg, stage_context(self, cfg, data, source, artifacts, selection), stage_fp)
        return self.manifest

    def _model_stages(self, data: PreparedData) -> tuple[Artifact, dict[str, Artifact]]:
        """Each model stage from the newest model that passed its gate; returns that model and every one kept."""
        source, upstream = planning.pretrained_artifact(self.recipe, data.fingerprint)
        artifacts: dict[str, Artifact] = {}
        stale_since: str | None = None
        for cfg in [c for c in self.recipe.stages if not REGISTRY[c.type].after_selection]:
            if not cfg.enabled:
                self.manifest.set_status(cfg.name, cfg.type, "disabled")
                continue
            if stale_since is not None:
                self._mark_stale(cfg, stale_since)
                continue
            reads = artifacts.get(cfg.branch_from()) if cfg.branch_from() else source
            if reads is None or (cfg.input_format is not None and reads.format != cfg.input_format):
                self._skip(cfg, reads)  # its export (or the stage it branches from) failed its gate
                continue
            stage_fp = planning.stage_fingerprint(cfg, upstream)
            result = self._run_or_reuse(cfg, stage_context(self, cfg, data, reads, artifacts), stage_fp)
            if result is None:  # out of date, and --only/--from left it out
                stale_since = self.ran[-1]
                self._mark_stale(cfg, stale_since)
                continue
            if result.artifact is not None:
                self.judge.evaluate(cfg.name, result.artifact, data)
                if not self.judge.passes_gate(cfg, source):
                    continue  # later stages start from the last model that passed, as if this one never ran
                artifacts[cfg.name] = result.artifact
                source = source if cfg.branch_from() else result.artifact
            upstream = planning.next_upstream(stage_fp, (self.manifest.stage(cfg.name) or {}).get("finished"))
        return source, artifacts

    def _skip(self, cfg: StageBase, reads: Artifact | None) -> None:
        if reads is None:
            reason = f"{cfg.branch_from()!r} made no model that passed its gate"
        else:
            reason = f"needs an {cfg.input_format} model; the newest model that passed its gate is {reads.stage!r}"
        self.manifest.set_status(cfg.name, cfg.type, "skipped", reason)
        self.say(f"{cfg.name}: skipped, {reason}", logging.WARNING)

    def _mark_stale(self, cfg: StageBase, changed: str) -> None:
        reason = f"its input changed when {changed!r} ran again; `toolkit run` rebuilds it"
        self.manifest.set_status(cfg.name, cfg.type, "stale", reason)
        self.say(f"{cfg.name}: stale, {reason}", logging.WARNING)

    def _select(self, data: PreparedData) -> Selection:
        from toolkit.selection import finalists, select, selected_artifact

        def choose() -> None:
            cfg, timing = self.recipe.select, None
            names = finalists(self.manifest, cfg)
            if cfg.finalist_rounds and len(names) > 1 and self.recipe.evaluate.speed.enabled:
                timing = self.judge.time_finalists(names, data)
            if timing is None:
                self.manifest.data.pop("finalist_timing", None)
            self.manifest.data["selection"] = select(self.manifest, cfg, timing)
            self.manifest.save()

        outcome = self.sync.run(choose)
        if outcome.error is not None and not isinstance(outcome.error, ValueError):
            raise outcome.error
        if outcome.failed:
            raise PlanError(str(outcome.error) if outcome.error else outcome.failure) from None
        self.manifest.reload()
        chosen = self.manifest.selection
        self.say(f"selected: {chosen['stage']} ({chosen['reason']})")
        artifact = selected_artifact(chosen)
        return Selection(artifact, chosen["reason"], self.manifest.stage(artifact.stage) or {}, self.manifest)

    def _reusable(self, name: str, stage_fp: str) -> StageResult | None:
        entry = self.manifest.reusable_entry(name, stage_fp)
        if entry is None:
            return None
        check = REGISTRY[entry["type"]].still_there
        if check is not None and not check(entry.get("info", {})):
            return None
        output = entry.get("output")
        return StageResult(Artifact.from_json(output) if output else None, entry.get("info", {}))

    def _run_or_reuse(self, cfg: StageBase, ctx: StageContext, stage_fp: str) -> StageResult | None:
        reused = None if cfg.name in self.plan.force else self._reusable(cfg.name, stage_fp)
        if reused is not None:
            self.say(f"{cfg.name}: up to date (fingerprint {stage_fp}), skipped")
            self.manifest.update(cfg.name, {"skipped_at": now()})
            return reused
        if cfg.name not in self.plan.run and not REGISTRY[cfg.type].after_selection:
            if self.ran:
                return None
            raise PlanError(
                f"stage {cfg.name!r} has no up-to-date result in {self.run_dir}; run it first "
                "(without --only/--from, or with --from at an earlier stage)"
            )
        return self._execute(cfg, ctx, stage_fp)

    def _execute(self, cfg: StageBase, ctx: StageContext, stage_fp: str) -> StageResult:
        name, stage = cfg.name, REGISTRY[cfg.type]
        self.ran.append(name)
        if self.sync.is_main:
            shutil.rmtree(ctx.out_dir, ignore_errors=True)
            ctx.out_dir.mkdir(parents=True)
        self.manifest.start(name, cfg.type, cfg.model_dump(mode="json"), stage_fp, ctx.source)
        self.sync.wait()
        self.say(f"{name} ({cfg.type}) from {(ctx.selection.artifact if ctx.selection else ctx.source).stage}")
        start = time.perf_counter()
        outcome = self.sync.run(lambda: stage.run(cfg, ctx), everywhere=stage.distributed)
        if outcome.failed:
            error = outcome.error or RuntimeError(f"on another process: {outcome.failure}")
            if self.sync.is_main:
                shutil.rmtree(ctx.out_dir, ignore_errors=True)
            self.manifest.fail(name, error)
            raise StageError(f"stage {name!r} failed: {type(error).__name__}: {error}") from error
        if self.sync.is_main:
            final = self.run_dir / name
            shutil.rmtree(final, ignore_errors=True)
            ctx.out_dir.rename(final)
            result = outcome.result
            artifact = Artifact(final, result.artifact.format, name) if result.artifact else None
            self.manifest.finish(name, artifact, result.info, time.perf_counter() - start, result.source)
        self.sync.wait()  # the main process renames and records first
        self.manifest.reload()
        entry = self.manifest.stage(name) or {}
        output = entry.get("output")
        return StageResult(Artifact.from_json(output) if output else None, entry.get("info", {}))


def stage_context(runner: Runner, cfg: StageBase, data, source, artifacts, selection=None) -> StageContext:
    """What a stage is given: its input model, the models before it, and the few run facts stages use."""
    recipe = runner.recipe
    return StageContext(
        run_dir=runner.run_dir,
        out_dir=runner.run_dir / f"{cfg.name}.partial",
        source=source,
        data=data,
        artifacts=dict(artifacts),
        device=recipe.device,
        max_length=recipe.model.max_length,
        model=ModelRef(recipe.model.name, recipe.model.revision),
        recipe_name=recipe.name,
        recipe_fingerprint=runner.recipe_fp,
        selection=selection,
    )
