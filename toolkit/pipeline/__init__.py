"""Runs a recipe (`run_recipe`): planning, the process sync, evaluation and gates, and the runner that ties them.

Progress goes to the `toolkit` logger (the CLI shows it; a library user attaches their own handler), and every
run also writes `RUN_DIR/run.log`, with the traceback of any unexpected error.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path

from toolkit.config import Recipe
from toolkit.errors import ToolkitError
from toolkit.manifest import Manifest
from toolkit.pipeline.errors import StageError
from toolkit.pipeline.planning import Plan, PlanError, make_plan

log = logging.getLogger("toolkit")
# What belongs in the run log but not on the terminal (an unexpected error's traceback).
trace = logging.getLogger("toolkit.trace")
trace.propagate = False
trace.addHandler(logging.NullHandler())
LOG_FILE = "run.log"


@contextlib.contextmanager
def run_log(run_dir: Path, enabled: bool = True) -> Iterator[Path]:
    """Everything the `toolkit` logger says during the block, also in `run_dir/run.log` (appended)."""
    path = Path(run_dir) / LOG_FILE
    if not enabled:
        yield path
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.setLevel(logging.DEBUG)
    log.addHandler(handler)
    trace.addHandler(handler)
    if log.level == logging.NOTSET or log.level > logging.INFO:
        log.setLevel(logging.INFO)
    try:
        yield path
    finally:
        log.removeHandler(handler)
        trace.removeHandler(handler)
        handler.close()


def run_recipe(
    recipe: Recipe,
    *,
    only: list[str] | None = None,
    from_: str | None = None,
    fresh: bool = False,
) -> Manifest:
    from accelerate import PartialState

    from toolkit.pipeline.runner import Runner
    from toolkit.pipeline.sync import Sync
    from toolkit.training import use_cpu

    plan = make_plan(recipe, only, from_, fresh)
    state = PartialState(cpu=use_cpu(recipe.device))
    with run_log(recipe.run_dir, enabled=state.is_main_process) as log_path:
        log.debug(f"toolkit run {recipe.name} (log: {log_path})")
        try:
            manifest = Runner(recipe, plan, Sync(state)).run()
            if state.num_processes > 1:
                # Left to the interpreter's exit, gloo's threads sometimes abort a helper process
                # ("terminate called without an active exception") after a successful run.
                state.wait_for_everyone()
                state.destroy_process_group()
            return manifest
        except ToolkitError as exc:
            # The terminal gets the message (the CLI's one line); the log also gets what caused it.
            trace.error(f"stopped: {exc}", exc_info=exc.__cause__ or exc)
            raise
        except Exception:
            trace.exception("unexpected error")
            raise


__all__ = ["LOG_FILE", "Plan", "PlanError", "StageError", "make_plan", "run_log", "run_recipe"]
