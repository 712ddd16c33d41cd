"""Runs a recipe: data once, then each enabled stage in order, each evaluated, everything in the manifest.

A stage's fingerprint is its options plus its input's fingerprint, so changing one stage re-runs it and
everything after it, and nothing before. Stages write into `<name>.partial/` which is renamed to `<name>/`
only on success: an interrupted stage leaves nothing a re-run would trust. Under `accelerate launch` every
process runs this; distributed stages (training) run on all of them, the rest on the main process only.
"""

from __future__ import annotations

import shutil
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from toolkit import __version__
from toolkit.data import PreparedData, prepare_data
from toolkit.gates import ParityGate, check_gate
from toolkit.manifest import Manifest, fingerprint, now
from toolkit.recipe import Recipe
from toolkit.stages import REGISTRY, Artifact, StageContext, StageResult


class StageError(RuntimeError):
    """A stage failed; the message names the stage and the reason, the manifest keeps the details."""


class PlanError(ValueError):
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


def pretrained_artifact(recipe: Recipe) -> tuple[Artifact, str]:
    model = recipe.model
    return Artifact(model.name, "pytorch", "pretrained"), fingerprint(model.model_dump())


class Runner:
    def __init__(self, recipe: Recipe, plan: Plan, state: Any, console: Any = None):
        self.recipe = recipe
        self.plan = plan
        self.state = state
        self.console = console
        self.run_dir = recipe.run_dir
        self.manifest = Manifest.load(self.run_dir)
        self.ran: list[str] = []  # stages run (not reused) in this invocation

    def say(self, message: str) -> None:
        if self.state.is_main_process and self.console is not None:
            self.console.print(message)

    def run(self) -> Manifest:
        recipe = self.recipe
        self.run_dir.mkdir(parents=True, exist_ok=True)
        with self.state.main_process_first():
            data = prepare_data(recipe.data, self.run_dir)
        self._record_header(data)
        source, upstream = pretrained_artifact(recipe)
        upstream = fingerprint(upstream, data.fingerprint)
        artifacts: dict[str, Artifact] = {}
        model_stages = [c for c in recipe.stages if not REGISTRY[c.type].after_selection]
        stale_since: str | None = None
        for cfg in model_stages:
            if stale_since is not None and cfg.enabled:
                self._mark_stale(cfg, stale_since)
                continue
            if not cfg.enabled:
                self._update(cfg.name, {"type": cfg.type, "status": "disabled"}, replace=True)
                continue
            needs = getattr(cfg, "input_format", None)
            if needs is not None and source.format != needs:  # the recipe has an export first: it failed its gate
                reason = f"needs an {needs} model; the newest model that passed its gate is {source.stage!r}"
                self._update(cfg.name, {"type": cfg.type, "status": "skipped", "reason": reason}, replace=True)
                self.say(f"[yellow]{cfg.name}: skipped, {reason}[/yellow]")
                continue
            # Gate tolerances are judged after evaluation; changing them re-judges without re-running the stage.
            stage_fp = fingerprint(cfg.model_dump(exclude={"name", "enabled", "parity"}), upstream)
            ctx = StageContext(
                recipe, self.run_dir, self.run_dir / f"{cfg.name}.partial", data, source, dict(artifacts)
            )
            result = self._run_or_reuse(cfg, ctx, stage_fp)
            if result is None:  # out of date, and --only/--from left it out
                stale_since = self.ran[-1]
                self._mark_stale(cfg, stale_since)
                continue
            if result.artifact is not None:
                self._evaluate(cfg.name, result.artifact, data)
                if not self._passes_gate(cfg, source):
                    continue  # later stages start from the last model that passed, as if this one never ran
                source = result.artifact
                artifacts[cfg.name] = result.artifact
            # Chained on when the stage last ran, not only on its options: a stage run again (--only, a deleted
            # folder) makes every later result stale.
            upstream = fingerprint(stage_fp, (self.manifest.stage(cfg.name) or {}).get("finished"))
        selected = self._select()
        for cfg in recipe.stages:
            if cfg in model_stages or not cfg.enabled:
                continue
            chosen = self.manifest.data["selection"]["stage"]
            made = self.manifest.stage(chosen) or {}
            # The chosen model's identity, not the figures around it: re-measuring speed must not re-package.
            stage_fp = fingerprint(
                cfg.model_dump(exclude={"name", "enabled"}), chosen, made.get("fingerprint"), made.get("finished")
            )
            ctx = StageContext(
                recipe,
                self.run_dir,
                self.run_dir / f"{cfg.name}.partial",
                data,
                source,
                dict(artifacts),
                selected,
            )
            self._run_or_reuse(cfg, ctx, stage_fp)
        return self.manifest

    def _mark_stale(self, cfg, changed: str) -> None:
        reason = f"its input changed when {changed!r} ran again; `toolkit run` rebuilds it"
        self._update(cfg.name, {"type": cfg.type, "status": "stale", "reason": reason}, replace=True)
        self.say(f"[yellow]{cfg.name}: stale, {reason}[/yellow]")

    def _select(self) -> Artifact:
        from toolkit.selection import select, selected_artifact

        error = None
        if self.state.is_main_process:
            try:
                self.manifest.data["selection"] = select(self.manifest, self.recipe)
                self.manifest.save()
                chosen = self.manifest.data["selection"]
                self.say(f"[bold]selected:[/bold] {chosen['stage']} ({chosen['reason']})")
            except Exception as exc:
                error = exc
        failure = self._shared_failure(error)
        if error is not None and not isinstance(error, ValueError):
            raise error
        if failure is not None:
            raise PlanError(str(error) if error else failure) from None
        self.manifest = Manifest.load(self.run_dir)
        return selected_artifact(self.manifest.data["selection"])

    def _record_header(self, data: PreparedData) -> None:
        if not self.state.is_main_process:
            return
        self.manifest.data.update(
            {
                "toolkit_version": __version__,
                "recipe": self.recipe.model_dump(mode="json"),
                "order": [s.name for s in self.recipe.stages],
                "data": {
                    "fingerprint": data.fingerprint,
                    "path": str(data.path),
                    "label_names": data.label_names,
                    "counts": {s: len(data.texts(s)) for s in ("train", "validation", "test")},
                },
            }
        )
        self.manifest.save()

    def _reusable(self, name: str, stage_fp: str) -> StageResult | None:
        entry = self.manifest.stage(name)
        if not entry or entry.get("status") not in ("done", "failed_gate") or entry.get("fingerprint") != stage_fp:
            return None
        output = entry.get("output")
        if output is not None and not Path(output["path"]).exists():
            return None
        check = REGISTRY[entry["type"]].still_there
        if check is not None and not check(entry.get("info", {})):
            return None
        return StageResult(Artifact.from_json(output) if output else None, entry.get("info", {}))

    def _run_or_reuse(self, cfg, ctx: StageContext, stage_fp: str) -> StageResult | None:
        name = cfg.name
        reused = None if name in self.plan.force else self._reusable(name, stage_fp)
        if reused is not None:
            self.say(f"[dim]{name}: up to date (fingerprint {stage_fp}), skipped[/dim]")
            self._update(name, {"skipped_at": now()})
            return reused
        if name not in self.plan.run and not REGISTRY[cfg.type].after_selection:
            if self.ran:
                return None
            raise PlanError(
                f"stage {name!r} has no up-to-date result in {self.run_dir}; run it first "
                "(without --only/--from, or with --from at an earlier stage)"
            )
        return self._execute(cfg, ctx, stage_fp)

    def _execute(self, cfg, ctx: StageContext, stage_fp: str) -> StageResult:
        name, stage = cfg.name, REGISTRY[cfg.type]
        self.ran.append(name)
        final = self.run_dir / name
        if self.state.is_main_process:
            shutil.rmtree(ctx.out_dir, ignore_errors=True)
            ctx.out_dir.mkdir(parents=True)
            entry = {
                "type": cfg.type,
                "config": cfg.model_dump(mode="json"),
                "fingerprint": stage_fp,
                "input": ctx.source.to_json(),
                "status": "running",
                "started": now(),
            }
            self.manifest.stages[name] = entry
            self.manifest.save()
        self.state.wait_for_everyone()
        self.say(f"[bold]{name}[/bold] ({cfg.type}) from {(ctx.selected or ctx.source).stage}")
        start = time.perf_counter()
        error = None
        result = None
        try:
            if stage.distributed or self.state.is_main_process:
                result = stage.run(cfg, ctx)
        except Exception as exc:  # recorded, then raised as a StageError with the stage's name
            error = exc
        failure = self._shared_failure(error)
        if failure is not None:
            self._fail(name, ctx.out_dir, error or RuntimeError(f"on another process: {failure}"))
        if not self.state.is_main_process:
            return self._result_from_main(name)
        shutil.rmtree(final, ignore_errors=True)
        ctx.out_dir.rename(final)
        artifact = result.artifact
        if artifact is not None:
            artifact = Artifact(final, artifact.format, name)
        if result.source is not None:
            self._update(name, {"input": result.source.to_json()})
        self._update(
            name,
            {
                "status": "done",
                "finished": now(),
                "seconds": round(time.perf_counter() - start, 2),
                "output": artifact.to_json() if artifact else None,
                "info": result.info,
            },
        )
        self.state.wait_for_everyone()
        return StageResult(artifact, result.info)

    def _shared_failure(self, error: Exception | None) -> str | None:
        """Whether any process failed (its message), known to every process; also a barrier. Without it an
        exception in a main-only step left the other processes waiting at the next barrier until the launcher
        killed them, with no word of why."""
        mine = f"{type(error).__name__}: {error}" if error is not None else None
        if self.state.num_processes == 1:
            return mine
        from accelerate.utils import gather_object

        failed = [m for m in gather_object([mine]) if m]
        return failed[0] if failed else None

    def _result_from_main(self, name: str) -> StageResult:
        self.state.wait_for_everyone()  # the main process renames and records first
        self.manifest = Manifest.load(self.run_dir)
        entry = self.manifest.stage(name) or {}
        output = entry.get("output")
        return StageResult(Artifact.from_json(output) if output else None, entry.get("info", {}))

    def _fail(self, name: str, partial: Path, error: Exception) -> None:
        if self.state.is_main_process:
            shutil.rmtree(partial, ignore_errors=True)
            self._update(
                name,
                {
                    "status": "failed",
                    "finished": now(),
                    "error": f"{type(error).__name__}: {error}",
                    "traceback": traceback.format_exception(error)[-6:],
                },
            )
        raise StageError(f"stage {name!r} failed: {type(error).__name__}: {error}") from error

    def _evaluate(self, name: str, artifact: Artifact, data: PreparedData) -> None:
        error = None
        try:
            if self.state.is_main_process:
                self._evaluate_on_main(name, artifact, data)
        except Exception as exc:
            error = exc
        failure = self._shared_failure(error)
        if error is not None:
            raise error
        if failure is not None:
            raise StageError(f"evaluating {name!r} failed on the main process: {failure}")

    def _evaluate_on_main(self, name: str, artifact: Artifact, data: PreparedData) -> None:
        from toolkit.evaluation import evaluate_artifact

        entry = self.manifest.stage(name)
        eval_fp = fingerprint(entry["fingerprint"], self.recipe.evaluate.model_dump(), self.recipe.model.max_length)
        logits_file = self.run_dir / "evals" / f"{name}.logits.npy"
        if entry.get("eval_fingerprint") != eval_fp or not logits_file.is_file() or name in self.plan.force:
            self.say(f"  evaluating {name} on the {self.recipe.evaluate.split} split")
            logits_file.parent.mkdir(exist_ok=True)
            # The stage's own record of its input: an export may have read an earlier model than the last one.
            reference = self.run_dir / "evals" / f"{entry['input']['stage']}.logits.npy"
            start = time.perf_counter()
            result = evaluate_artifact(
                artifact,
                data,
                self.recipe.evaluate,
                self.recipe.model.max_length,
                logits_file,
                np.load(reference) if reference.is_file() else None,
                device=self.recipe.device,
            )
            self._update(
                name,
                {
                    "evaluation": result,
                    "eval_fingerprint": eval_fp,
                    "eval_seconds": round(time.perf_counter() - start, 2),
                },
            )

    def _passes_gate(self, cfg, source: Artifact) -> bool:
        """Judge a gated stage's parity; a failure is recorded as `failed_gate` and said plainly."""
        gate = getattr(cfg, "parity", None)
        if not isinstance(gate, ParityGate):
            return True
        if self.state.is_main_process:
            entry = self.manifest.stage(cfg.name)
            verdict = check_gate(gate, (entry.get("evaluation") or {}).get("parity"))
            self._update(cfg.name, {"gate": verdict, "status": "done" if verdict["passed"] else "failed_gate"})
            if not verdict["passed"]:
                self.say(
                    f"[bold red]{cfg.name}: FAILED its parity gate ({'; '.join(verdict['reasons'])}); "
                    f"its model is not used, later stages start from {source.stage!r}[/bold red]"
                )
        self.state.wait_for_everyone()
        self.manifest = Manifest.load(self.run_dir)
        return self.manifest.stage(cfg.name)["gate"]["passed"]

    def _update(self, name: str, fields: dict[str, Any], replace: bool = False) -> None:
        """Merge into the stage's entry; `replace` drops what an earlier run left (outputs, figures)."""
        if self.state.is_main_process:
            if replace:
                self.manifest.stages[name] = {}
            self.manifest.stages.setdefault(name, {}).update(fields)
            self.manifest.save()


def run_recipe(
    recipe: Recipe,
    *,
    only: list[str] | None = None,
    from_: str | None = None,
    fresh: bool = False,
    console: Any = None,
) -> Manifest:
    from accelerate import PartialState

    from toolkit.training import use_cpu

    plan = make_plan(recipe, only, from_, fresh)
    state = PartialState(cpu=use_cpu(recipe.device))
    return Runner(recipe, plan, state, console).run()
