"""The command line through Typer's runner, plus real processes where the process boundary is the point."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import launch_two_processes
from typer.testing import CliRunner

from toolkit.cli import app

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()


def test_validate_valid_recipe(toy_recipe, write_recipe):
    result = runner.invoke(app, ["validate", str(write_recipe(toy_recipe))])
    assert result.exit_code == 0, result.output
    assert "valid recipe 'toy'" in result.output
    assert "stages: train" in result.output


def test_validate_invalid_recipe_lists_every_problem_without_traceback(toy_recipe, write_recipe):
    toy_recipe["stages"][0]["epochs"] = "many"
    toy_recipe["evaluate"]["split"] = "dev"
    result = runner.invoke(app, ["validate", str(write_recipe(toy_recipe))])
    assert result.exit_code == 1
    assert "stages[0].epochs: Input should be a valid integer" in result.output
    assert "evaluate.split: Input should be 'test' or 'validation' (got 'dev')" in result.output
    assert "Traceback" not in result.output


def test_run_prints_the_table_and_report_reprints_it(toy_recipe, write_recipe, tmp_path):
    result = runner.invoke(app, ["run", str(write_recipe(toy_recipe))])
    assert result.exit_code == 0, result.output
    assert "accuracy" in result.output and "train" in result.output
    assert f"run folder: {tmp_path / 'run'}" in result.output
    report = runner.invoke(app, ["report", str(tmp_path / "run")])
    assert report.exit_code == 0 and "p50 ms" in report.output
    missing = runner.invoke(app, ["report", str(tmp_path)])
    assert missing.exit_code == 1 and "has no manifest.json" in missing.output


def test_run_bad_data_is_one_clear_line(toy_recipe, write_recipe, tmp_path):
    (tmp_path / "train.tsv").write_text("index\tsentence\tlabel\n0\tgood\t1\n1\tbad\n")
    toy_recipe["data"]["train"] = "train.tsv"
    result = runner.invoke(app, ["run", str(write_recipe(toy_recipe))])
    assert result.exit_code == 1
    assert "train.tsv:3: expected 3 tab-separated fields" in result.output
    assert "Traceback" not in result.output


def test_help_does_not_import_heavy_libraries():
    # `toolkit --help` must answer at once: the CLI module may not pull in torch, transformers or datasets.
    code = "import sys, toolkit.cli, toolkit.recipe; print(sorted(m for m in ('torch', 'transformers', 'datasets', 'onnxruntime', 'bentoml') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip() == "[]"
    helped = subprocess.run([sys.executable, "-m", "toolkit", "--help"], capture_output=True, text=True, cwd=ROOT)
    assert helped.returncode == 0 and "validate" in helped.stdout


@pytest.mark.slow
def test_two_process_accelerate_launch_fine_tune(toy_recipe, write_recipe, tmp_path):
    """Two CPU processes with DDP (gloo): each sees half the batches and both agree on one saved model."""
    done = launch_two_processes(write_recipe(toy_recipe), tmp_path)
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    train = manifest["stages"]["train"]
    assert train["info"]["num_processes"] == 2
    single_batches = -(-int(manifest["data"]["counts"]["train"]) // 16)
    assert train["info"]["train_batches_per_process"] == -(-single_batches // 2)
    assert train["evaluation"]["accuracy"] >= 0.9
    assert train["evaluation"]["logits_processes"] == 2  # each process scored half the split, main gathered
    assert not list((tmp_path / "run" / "evals").glob("share-*"))
    assert done.stdout.count("run folder:") == 1  # the table is printed by the main process only


@pytest.mark.slow
def test_two_processes_both_stop_when_a_main_only_stage_fails(toy_recipe, write_recipe, tmp_path):
    """A main-process-only stage (push, offline here) fails: the other process learns it and exits too, instead
    of waiting at the next barrier until the launcher's timeout."""
    toy_recipe["stages"][0]["epochs"] = 1
    toy_recipe["stages"].append({"type": "push", "repo_id": "user/toy"})
    start = time.perf_counter()
    done = launch_two_processes(write_recipe(toy_recipe), tmp_path, expect_success=False)
    assert time.perf_counter() - start < 300
    output = done.stdout + done.stderr
    assert "stage 'push' failed: HubError: HF_HUB_OFFLINE is set" in output
    assert "on another process: HubError" in output  # the second process's own error names the first one's
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert manifest["stages"]["push"]["status"] == "failed"


def test_every_toolkit_error_shares_one_base():
    from toolkit.data import DataError
    from toolkit.errors import ToolkitError
    from toolkit.hub import HubError
    from toolkit.pipeline import PlanError, StageError
    from toolkit.pruning import PruningError
    from toolkit.recipe import RecipeError
    from toolkit.sources import SourceError

    for error in (DataError, HubError, PlanError, StageError, PruningError, RecipeError, SourceError):
        assert issubclass(error, ToolkitError), error


def test_unexpected_error_is_one_line_and_the_traceback_goes_to_the_run_log(toy_recipe, write_recipe, tmp_path):
    from unittest import mock

    from toolkit.cli import app

    def broken(self, data):
        raise KeyError("a bug in selection")

    with mock.patch("toolkit.pipeline.runner.Runner._select", broken):
        result = CliRunner().invoke(app, ["run", str(write_recipe(toy_recipe))])
    log_file = tmp_path / "run" / "run.log"
    assert result.exit_code == 1
    assert f"error: unexpected KeyError: 'a bug in selection'; the traceback is in {log_file}" in result.output
    assert "Traceback" not in result.output
    logged = log_file.read_text()
    assert "Traceback" in logged and "raise KeyError" in logged
    assert "train (train) from pretrained" in logged  # the progress too, not only the failure


def test_engine_logs_through_logging_for_library_users(toy_recipe, write_recipe, caplog):
    import logging

    from toolkit.pipeline import run_recipe
    from toolkit.recipe import load_recipe

    with caplog.at_level(logging.INFO, logger="toolkit"):
        run_recipe(load_recipe(write_recipe(toy_recipe)))
    messages = [r.getMessage() for r in caplog.records if r.name == "toolkit"]
    assert "train (train) from pretrained" in messages
    assert any(m.startswith("selected: train") for m in messages)


def test_validate_explain_shows_each_option_with_its_value_and_meaning(toy_recipe, write_recipe):
    result = CliRunner().invoke(app, ["validate", str(write_recipe(toy_recipe)), "--explain"])
    assert result.exit_code == 0, result.output
    assert "    epochs: 8  # Passes over the training split." in result.output
    assert "    seed: 42 (default)  # Seed for weights, shuffling and dropout." in result.output


@pytest.mark.slow
def test_shipped_accelerate_config_starts_two_cpu_processes(toy_recipe, write_recipe, tmp_path):
    """configs/accelerate/cpu-2-processes.yaml, as a user runs it: two processes that train one model."""
    import os

    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    config = ROOT / "configs" / "accelerate" / "cpu-2-processes.yaml"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config),
           "-m", "toolkit", "run", str(write_recipe(toy_recipe))]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, env=env, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    train = json.loads((tmp_path / "run" / "manifest.json").read_text())["stages"]["train"]
    assert train["info"]["num_processes"] == 2
    for name in (
        "gpu-1.yaml",
        "multi-gpu.yaml",
        "fsdp.yaml",
    ):  # the GPU configs at least parse as accelerate reads them
        from accelerate.commands.config.config_args import load_config_from_file

        assert load_config_from_file(str(config.parent / name)).num_machines == 1
