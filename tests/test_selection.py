"""Accuracy-aware selection on recorded figures (no models needed): constraints, objectives, gate failures,
and the fine-tuned model kept when nothing qualifies."""

from __future__ import annotations

from pathlib import Path

import pytest

from toolkit.config import SelectConfig
from toolkit.manifest import Manifest
from toolkit.report import markdown, stage_rows
from toolkit.selection import select


def entry(kind: str, accuracy: float, p50: float, size_mb: float, throughput: float, status: str = "done") -> dict:
    return {
        "type": kind,
        "status": status,
        "output": {"path": f"/runs/x/{kind}", "format": "onnx" if kind != "train" else "pytorch", "stage": kind},
        "evaluation": {
            "accuracy": accuracy,
            "macro_f1": accuracy,
            "size_bytes": int(size_mb * 1e6),
            "speed": {"latency_p50_ms": p50, "latency_p95_ms": p50 * 1.2, "throughput_per_s": throughput},
        },
    }


def manifest(**overrides) -> Manifest:
    stages = {
        "train": entry("train", 0.800, 10.0, 90.0, 100.0),
        "export": entry("export", 0.800, 6.0, 90.0, 150.0),
        "optimize": entry("optimize", 0.799, 5.0, 90.0, 170.0),
        "quantize": entry("quantize", 0.790, 2.5, 23.0, 160.0),
    }
    stages.update(overrides)
    return Manifest(Path("/runs/x"), {"order": list(stages), "stages": stages})


def choose(m: Manifest, **select_options) -> dict:
    return select(m, SelectConfig(**select_options))


def test_fastest_within_one_point_wins():
    result = choose(manifest(), max_accuracy_drop=1.0)
    assert result["stage"] == "quantize" and result["qualified"]
    assert result["baseline"] == "train"
    assert "latency worse" in result["candidates"]["train"]["lost"]
    assert result["candidates"]["quantize"]["accuracy_drop"] == pytest.approx(1.0)


def test_accuracy_limit_drops_int8_and_says_why():
    result = choose(manifest(), max_accuracy_drop=0.5)
    assert result["stage"] == "optimize"
    assert "accuracy drop 1.00 pts (absolute) > max 0.5" in result["candidates"]["quantize"]["lost"]


def test_relative_drop_mode_measures_percent_of_baseline():
    # 1.0 point of 80% accuracy is a 1.25% relative drop.
    assert choose(manifest(), max_accuracy_drop=1.2, drop_mode="relative")["stage"] == "optimize"
    assert choose(manifest(), max_accuracy_drop=1.3, drop_mode="relative")["stage"] == "quantize"


def test_objectives_throughput_and_size():
    assert choose(manifest(), objective="throughput")["stage"] == "optimize"
    assert choose(manifest(), objective="size")["stage"] == "quantize"


def test_latency_and_size_limits():
    result = choose(manifest(), max_accuracy_drop=0.5, max_latency_ms=5.5, max_size_mb=50)
    assert not result["qualified"] and result["stage"] == "train"
    assert "size 90.00 MB > max 50.0 MB" in result["candidates"]["optimize"]["lost"]
    assert "batch-1 p50 latency 6.00 ms > max 5.5 ms" in result["candidates"]["export"]["lost"]


def test_nothing_qualifies_keeps_fine_tuned_model_with_clear_message():
    result = choose(manifest(), max_latency_ms=1.0)
    assert result["stage"] == "train" and result["qualified"] is False
    assert result["reason"].startswith("no candidate meets the constraints")
    assert "keeping the fine-tuned model 'train'" in result["reason"]
    assert result["artifact"]["path"] == "/runs/x/train"
    assert all(c["lost"] for c in result["candidates"].values())


def test_failed_gate_is_not_a_candidate_but_is_listed():
    bad = entry("quantize", 0.80, 1.0, 20.0, 300.0, status="failed_gate")
    bad["gate"] = {"passed": False, "reasons": ["agreement 0.9000 < 0.99"]}
    result = choose(manifest(quantize=bad))
    assert result["stage"] == "optimize"
    assert "failed_gate" in result["candidates"]["quantize"]["lost"]
    assert "agreement 0.9000 < 0.99" in result["candidates"]["quantize"]["lost"]


def test_report_rows_show_speedup_and_selection():
    m = manifest()
    m.data["selection"] = choose(m)
    rows = {r["stage"]: r for r in stage_rows(m)}
    assert rows["quantize"]["speedup"] == pytest.approx(4.0)
    assert rows["quantize"]["accuracy_change_pts"] == pytest.approx(-1.0)
    assert rows["quantize"]["selected"] == "yes" and rows["train"]["selected"] == ""
    text = markdown(m, None)
    assert "| quantize | quantize | done | 0.7900 |" in text and "4.00x" in text


def test_select_section_validation(toy_recipe, write_recipe):
    from typer.testing import CliRunner

    from toolkit.cli import app

    recipe = {**toy_recipe, "select": {"objective": "speed", "max_accuracy_drop": -1}}
    result = CliRunner().invoke(app, ["validate", str(write_recipe(recipe))])
    assert result.exit_code == 1
    assert "select.objective" in result.output and "'latency', 'throughput' or 'size'" in result.output
    assert "select.max_accuracy_drop" in result.output


def timed(p50: float, throughput: float, latency_spread: float = 0.02, throughput_spread: float = 0.02) -> dict:
    load = {"busy": False, "others_cores": 0.0, "cores": 2, "loadavg_1m": 0.1}
    return {"latency_p50_ms": p50, "latency_p95_ms": p50 * 1.1, "latency_spread": latency_spread,
            "throughput_per_s": throughput, "throughput_spread": throughput_spread, "rounds": 5, "load": load}  # fmt: skip


def test_finalists_are_the_candidates_within_the_quality_and_size_limits():
    from toolkit.selection import finalists

    m = manifest(optimize=entry("optimize", 0.799, 5.0, 90.0, 170.0, status="failed_gate"))
    assert finalists(m, SelectConfig(max_accuracy_drop=0.5)) == ["train", "export"]
    # A latency limit does not shrink the finalists: it is judged on the side-by-side figures.
    assert finalists(m, SelectConfig(max_accuracy_drop=1.0, max_latency_ms=1.0)) == ["train", "export", "quantize"]


def test_side_by_side_figures_decide_and_per_stage_ones_stay_in_the_record():
    # Per stage, quantize looked fastest (2.5 ms; say export was timed on a quiet machine, quantize too);
    # side by side export is faster: the side-by-side figures win.
    timing = {"train": timed(10.0, 100.0), "export": timed(2.0, 200.0), "quantize": timed(2.4, 190.0)}
    result = select(manifest(), SelectConfig(max_accuracy_drop=1.0), timing)
    assert result["stage"] == "export" and "timed side by side" in result["reason"]
    record = result["candidates"]["quantize"]
    assert record["latency_p50_ms"] == 2.4 and record["stage_latency_p50_ms"] == 2.5 and record["side_by_side"]
    assert result["close_call"] is None  # a 20% lead against 2% noise


def test_a_lead_smaller_than_the_noise_is_said():
    timing = {"export": timed(2.0, 200.0, latency_spread=0.15), "quantize": timed(2.1, 190.0)}
    result = select(manifest(), SelectConfig(max_accuracy_drop=1.0), timing)
    assert result["stage"] == "export"
    assert "export leads quantize by 5.0%" in result["close_call"] and "15.0%" in result["close_call"]
    m = manifest()
    m.data["selection"] = result
    from toolkit.report import selection_lines

    assert any("close call" in line for line in selection_lines(m))


def test_finalists_take_turns_in_a_new_order_every_round(monkeypatch):
    """Each round times every finalist once on the next texts, each turn opening with an untimed settling call,
    and the order changes between rounds (seeded: a rerun repeats it)."""
    from toolkit import evaluation
    from toolkit.config import SpeedConfig

    monkeypatch.setattr(evaluation, "SETTLE_SECONDS", 0.0)  # one settling call per turn

    texts = [f"text {i}" for i in range(200)]

    def turns() -> list[list[tuple[str, tuple[str, ...]]]]:
        calls: list[tuple[str, tuple[str, ...]]] = []
        predictors = {name: (lambda batch, name=name: calls.append((name, tuple(batch)))) for name in "ABCD"}
        speed = SpeedConfig(latency_samples=60, throughput_batch_size=2, throughput_samples=12)
        evaluation.side_by_side(predictors, texts, speed, rounds=6)
        timed = calls[4 * 66 :]  # after the untimed pass: every round's 10 single texts and 1 batch, per finalist
        return [timed[t * 12 : t * 12 + 12] for t in range(6 * 4)]

    first = turns()
    for t, turn in enumerate(first):
        r, name = t // 4, turn[0][0]
        batch = tuple(texts[2 * r : 2 * r + 2])  # each round times the next texts
        singles = [(name, (text,)) for text in texts[10 * r : 10 * r + 10]]
        assert turn == [(name, batch), *singles, (name, batch)]  # settling call, then the timed ones
    rounds = [tuple(turn[0][0] for turn in first[r * 4 : r * 4 + 4]) for r in range(6)]
    assert all(sorted(r) == list("ABCD") for r in rounds)
    assert len(set(rounds)) > 1
    assert turns() == first
