"""After a model stage: measure its model (quality, parity with its input, speed, size) and judge its parity
gate. Under several processes each computes the logits of its share of the evaluation split; the main process
gathers them, scores them and times the model alone (timing beside other processes would measure them too);
every process learns the verdict."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np

from toolkit.config import Recipe, StageBase
from toolkit.data import PreparedData
from toolkit.gates import check_gate
from toolkit.manifest import Artifact, Manifest, fingerprint
from toolkit.pipeline.errors import StageError
from toolkit.pipeline.sync import Sync

log = logging.getLogger("toolkit")


class Judge:
    def __init__(self, recipe: Recipe, manifest: Manifest, sync: Sync, forced: set[str]):
        self.recipe = recipe
        self.manifest = manifest
        self.sync = sync
        self.forced = forced  # stages whose figures are measured again even when up to date

    def evaluate(self, name: str, artifact: Artifact, data: PreparedData) -> None:
        processes = self.sync.num_processes
        if processes > 1 and self.sync.decide(lambda: self._needs_evaluation(name)):
            self._check(name, self.sync.run(lambda: self._logits_share(artifact, data, processes), everywhere=True))
        self._check(name, self.sync.run(lambda: self._evaluate_on_main(name, artifact, data, processes)))

    @staticmethod
    def _check(name: str, outcome) -> None:
        if outcome.error is not None:
            raise outcome.error
        if outcome.failed:
            raise StageError(f"evaluating {name!r} failed: {outcome.failure}")

    def _eval_fingerprint(self, name: str) -> str:
        recipe = self.recipe
        return fingerprint(
            self.manifest.stage(name)["fingerprint"], recipe.evaluate.model_dump(), recipe.model.max_length
        )

    def _needs_evaluation(self, name: str) -> bool:
        entry = self.manifest.stage(name)
        logits_file = self.manifest.run_dir / "evals" / f"{name}.logits.npy"
        fresh = entry.get("eval_fingerprint") == self._eval_fingerprint(name) and logits_file.is_file()
        return not fresh or name in self.forced

    def _share_file(self, rank: int) -> Path:
        return self.manifest.run_dir / "evals" / f"share-{rank}.logits.npy"

    def _logits_share(self, artifact: Artifact, data: PreparedData, processes: int) -> None:
        """This process's contiguous share of the evaluation split's logits, saved for the main process."""
        from toolkit.evaluation import logits_of

        rank, cfg = self.sync.rank, self.recipe.evaluate
        texts = data.texts(cfg.split)
        lo, hi = np.linspace(0, len(texts), processes + 1).astype(int)[rank : rank + 2]
        logits = logits_of(artifact, texts[lo:hi], cfg, self.recipe.model.max_length, self.recipe.device)
        self._share_file(rank).parent.mkdir(exist_ok=True)
        np.save(self._share_file(rank), logits)

    def _evaluate_on_main(self, name: str, artifact: Artifact, data: PreparedData, processes: int) -> None:
        from toolkit.evaluation import evaluate_artifact

        recipe, entry = self.recipe, self.manifest.stage(name)
        eval_fp = self._eval_fingerprint(name)
        evals = self.manifest.run_dir / "evals"
        logits_file = evals / f"{name}.logits.npy"
        if not self._needs_evaluation(name):
            return
        shares = [self._share_file(rank) for rank in range(processes)] if processes > 1 else []
        gathered = np.concatenate([np.load(share) for share in shares]) if shares else None
        for share in shares:
            share.unlink()
        log.info(f"  evaluating {name} on the {recipe.evaluate.split} split")
        evals.mkdir(exist_ok=True)
        # The stage's own record of its input: an export may have read an earlier model than the last one.
        reference = evals / f"{entry['input']['stage']}.logits.npy"
        start = time.perf_counter()
        result = evaluate_artifact(
            artifact,
            data,
            recipe.evaluate,
            recipe.model.max_length,
            logits_file,
            np.load(reference) if reference.is_file() else None,
            device=recipe.device,
            logits=gathered,
        )
        seconds = round(time.perf_counter() - start, 2)
        result["logits_processes"] = processes if shares else 1
        self.manifest.update(name, {"evaluation": result, "eval_fingerprint": eval_fp, "eval_seconds": seconds})

    def time_finalists(self, names: list[str], data: PreparedData) -> dict[str, dict]:
        """The finalists' side-by-side speed (main process only), recorded in the manifest."""
        from toolkit.evaluation import side_by_side
        from toolkit.runtime import load_model

        recipe = self.recipe
        speed = recipe.evaluate.speed
        models = {}
        for name in names:
            output = self.manifest.stage(name)["output"]
            models[name] = load_model(output["path"], output["format"], recipe.model.max_length, speed.threads,
                                      recipe.device).logits  # fmt: skip
        log.info(f"  timing {len(names)} finalists side by side: {', '.join(names)}")
        timing = side_by_side(models, list(data.texts(recipe.evaluate.split)), speed, recipe.select.finalist_rounds)
        self.manifest.data["finalist_timing"] = timing
        return timing

    def passes_gate(self, cfg: StageBase, source: Artifact) -> bool:
        """Judge a gated stage's parity; a failure is recorded as `failed_gate` and said plainly."""
        gate = getattr(cfg, "parity", None)
        if gate is None:
            return True
        if self.sync.is_main:
            entry = self.manifest.stage(cfg.name)
            verdict = check_gate(gate, (entry.get("evaluation") or {}).get("parity"))
            self.manifest.update(cfg.name, {"gate": verdict, "status": "done" if verdict["passed"] else "failed_gate"})
            if not verdict["passed"]:
                log.error(
                    f"{cfg.name}: FAILED its parity gate ({'; '.join(verdict['reasons'])}); "
                    f"its model is not used, later stages start from {source.stage!r}"
                )
        self.sync.wait()
        self.manifest.reload()
        return self.manifest.stage(cfg.name)["gate"]["passed"]
