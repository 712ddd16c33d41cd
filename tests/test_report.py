"""Figures a user can trust and a report they read: the machine's load is measured with every speed figure,
the finalists are timed side by side, and the HTML report renders in a real browser."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
from typer.testing import CliRunner

from toolkit.cli import app
from toolkit.machine import LoadMeter
from toolkit.manifest import Manifest


@contextmanager
def burning(cores: int):
    """`cores` processes spinning at full speed: a busy machine, for real."""
    procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(cores)]
    try:
        time.sleep(0.3)
        yield
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()


def test_load_meter_sees_another_process_take_a_core():
    with burning(1), LoadMeter() as meter:
        time.sleep(1.5)
    assert meter.result["others_cores"] >= 0.7 and meter.result["busy"]
    assert meter.result["cores"] >= 1 and "loadavg_1m" in meter.result


def onnx_recipe(toy_recipe: dict, samples: int = 60) -> dict:
    toy_recipe["stages"] += [{"type": "export"}, {"type": "quantize", "parity": {"min_agreement": 0.8}}]
    toy_recipe["evaluate"]["speed"] = {"threads": 1, "warmup": 2, "latency_samples": samples,
                                       "throughput_samples": samples}  # fmt: skip
    return toy_recipe


def run(recipe_path: Path) -> dict:
    result = CliRunner().invoke(app, ["run", str(recipe_path), "--fresh"])
    assert result.exit_code == 0, result.output
    return Manifest.load(recipe_path.parent / "run").data


@pytest.mark.slow
def test_disturbed_measurement_is_flagged_and_selection_unchanged(toy_recipe, write_recipe, monkeypatch):
    """A CPU-burning job during one stage's measurement: the report flags that stage's figures, and the choice
    is made on the finalists timed side by side, not on the disturbed figures."""
    import toolkit.evaluation as evaluation

    # Enough calls that the measurement spans many of /proc/stat's 10 ms ticks (about a second on the tiny model).
    path = write_recipe(onnx_recipe(toy_recipe, samples=4000))
    quiet = run(path)
    chosen = quiet["selection"]["stage"]
    assert chosen != "train" and set(quiet["finalist_timing"]) >= {"train", chosen}

    original = evaluation.evaluate_artifact

    def disturbed(artifact, *args, **kwargs):
        if artifact.stage != chosen:
            return original(artifact, *args, **kwargs)
        with burning(3):
            return original(artifact, *args, **kwargs)

    monkeypatch.setattr(evaluation, "evaluate_artifact", disturbed)
    busy = run(path)
    load = busy["stages"][chosen]["evaluation"]["speed"]["load"]
    assert load["busy"] and load["others_cores"] >= 1.0
    # The choice rests on the side-by-side figures, not on the disturbed ones. (Which of two near-equal tiny
    # graphs wins that timing is the machine's noise, so the test does not compare the two runs' choices.)
    timing, candidates = busy["finalist_timing"], busy["selection"]["candidates"]
    assert candidates[chosen]["side_by_side"]
    assert candidates[chosen]["latency_p50_ms"] == timing[chosen]["latency_p50_ms"]
    assert busy["selection"]["stage"] == min(timing, key=lambda name: timing[name]["latency_p50_ms"])
    report = (path.parent / "run" / "report.md").read_text()
    assert re.search(rf"- {chosen}: speed measured on a busy machine \(other processes used", report)
    assert "BUSY (" in report


@pytest.mark.slow
def test_report_renders_in_chromium_with_every_part(toy_recipe, write_recipe, tmp_path):
    browser = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    path = write_recipe(onnx_recipe(toy_recipe))
    data = run(path)
    page = (path.parent / "run" / "report.html").read_text()
    for part in ("Stages", "Accuracy, latency and throughput", "Per class", "Training", "Recipe as it ran"):
        assert f"<h2>{part}" in page
    assert len(re.findall(r'<img alt="[^"]+" src="data:image/png;base64,', page)) == 4
    assert data["environment"]["cpu"] in page and "onnxruntime " in page and "train: " in page
    assert "<tr class='selected'>" in page or "<tr class='selected busy'>" in page
    assert "http://" not in page and "https://" not in page  # self-contained
    if browser is None:
        pytest.skip("no Chromium (Debian: apt-get install chromium) to render the page; the HTML checks passed")
    shot = tmp_path / "report.png"
    subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                    "--window-size=1280,2600", f"--screenshot={shot}", (path.parent / "run" / "report.html").as_uri()],
                   check=True, capture_output=True, timeout=120)  # fmt: skip
    assert shot.stat().st_size > 50_000  # a blank page is a few kB


def test_report_says_how_the_selected_model_was_served(tmp_path):
    """The package stage's serving-parity replay in the selection lines of the terminal, markdown and HTML report;
    a package stage that failed it, in the notes."""
    from toolkit.report import html_page, markdown, notes, selection_lines

    record = {"split": "test", "texts": 2040, "agreement": 1.0, "changed_texts": 0, "max_logit_difference": 3.1e-7,
              "clients": 32, "model_calls": 211, "call_sizes": {"min": 1, "max": 64}, "changed": []}  # fmt: skip
    evaluation = {"split": "test", "n": 2040, "accuracy": 0.9, "macro_f1": 0.9}
    manifest = Manifest(tmp_path, {
        "order": ["quantize", "package"],
        "stages": {"quantize": {"type": "quantize", "status": "done", "evaluation": evaluation},
                   "package": {"type": "package", "status": "done", "info": {"tag": "t:1", "serving_parity": record}}},
        "selection": {"stage": "quantize", "reason": "best latency", "baseline": "quantize"},
    })  # fmt: skip
    line = "Served as evaluated: 100.00 % of 2,040 test texts, max logit difference 3.1e-07"
    assert any(line in shown for shown in selection_lines(manifest))
    assert line in markdown(manifest, None, {}) and line in html_page(manifest, None, {})
    assert "micro-batcher: 32 concurrent clients, 211 model calls of 1-64 texts" in markdown(manifest, None, {})

    manifest.stages["package"] = {"type": "package", "status": "failed",
                                  "error": "ServingParityError: serving parity: 3 of 2,040 test texts got another "
                                           "class...\n  #12 'a text': evaluated positive, served negative"}  # fmt: skip
    assert not any("Served as evaluated" in shown for shown in selection_lines(manifest))
    assert "- package FAILED: ServingParityError: serving parity: 3 of 2,040 test texts got another class..." in notes(
        manifest
    )


def test_a_student_that_misses_the_budget_gets_its_curve_diagnosis(tmp_path):
    from toolkit.report import selection_lines

    curve = "still improving at the last epoch (+1.20 pts validation accuracy): more epochs, or more ..."
    evaluation = {"split": "test", "n": 100, "accuracy": 0.8}
    manifest = Manifest(tmp_path, {
        "order": ["train", "distill"],
        "stages": {"train": {"type": "train", "status": "done", "evaluation": evaluation, "info": {"curve": "x"}},
                   "distill": {"type": "distill", "status": "done", "evaluation": evaluation, "info": {"curve": curve}}},
        "selection": {"stage": "train", "reason": "best latency", "baseline": "train", "candidates": {
            "distill": {"lost": "accuracy drop 3.00 pts (absolute) > max 1.5",
                        "reasons": ["accuracy drop 3.00 pts (absolute) > max 1.5"]},
            "train": {"lost": "", "reasons": []}}},
    })  # fmt: skip
    lines = selection_lines(manifest)
    assert f"- distill not chosen: accuracy drop 3.00 pts (absolute) > max 1.5; its validation curve: {curve}" in lines
    manifest.data["selection"]["candidates"]["distill"] = {"lost": "p50 9 ms > max 5 ms", "reasons": ["p50 9 ms"]}
    assert not any("validation curve" in line for line in selection_lines(manifest))  # slow, not short of accuracy


def test_training_curves_carry_the_teacher_line(tmp_path):
    from toolkit import plots
    from toolkit.report import teacher_line

    history = [{"epoch": 1, "train_loss": 0.5, "accuracy": 0.81}, {"epoch": 2, "train_loss": 0.4, "accuracy": 0.84}]
    student = [{"epoch": e, "train_loss": 1.0 / e, "accuracy": 0.7 + 0.03 * e} for e in (1, 2, 3)]
    manifest = Manifest(tmp_path, {
        "order": ["train", "distill"],
        "stages": {"train": {"type": "train", "status": "done", "evaluation": {"accuracy": 0.83}, "output": {"format": "pytorch"},
                             "info": {"history": history}},
                   "distill": {"type": "distill", "status": "done", "info": {"history": student}}},
    })  # fmt: skip
    assert teacher_line(manifest) == ("train", 0.84)
    png = plots.training_curves({"train": history, "distill": student}, tmp_path / "t.png", teacher_line(manifest))
    assert png is not None and png.stat().st_size > 10_000
