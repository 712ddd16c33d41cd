"""Resumable runs: unchanged stages are skipped, changed ones re-run, interrupted ones leave nothing trusted."""

from __future__ import annotations

import json

import pytest

from toolkit.pipeline import PlanError, StageError, run_recipe
from toolkit.recipe import load_recipe
from toolkit.stages import REGISTRY, Stage
from toolkit.stages.train import TrainConfig


def two_stage(toy_recipe: dict) -> dict:
    """train, then a second short fine-tune of the result (a stand-in for any downstream stage)."""
    toy_recipe["stages"].append({"type": "train", "name": "retrain", "epochs": 1, "learning_rate": 1e-4})
    return toy_recipe


def manifest_of(tmp_path) -> dict:
    return json.loads((tmp_path / "run" / "manifest.json").read_text())


def test_rerun_skips_unchanged_and_reruns_what_changed(toy_recipe, write_recipe, tmp_path):
    path = write_recipe(two_stage(toy_recipe))
    first = run_recipe(load_recipe(path)).data["stages"]
    assert first["retrain"]["input"]["stage"] == "train"
    assert first["retrain"]["evaluation"]["parity"]["n"] == first["retrain"]["evaluation"]["n"]

    again = run_recipe(load_recipe(path)).data["stages"]
    for name in ("train", "retrain"):
        assert again[name]["started"] == first[name]["started"]  # not run again
        assert "skipped_at" in again[name]

    toy_recipe["stages"][1]["learning_rate"] = 2e-4  # only the second stage changes
    changed = run_recipe(load_recipe(write_recipe(toy_recipe))).data["stages"]
    assert changed["train"]["started"] == first["train"]["started"]
    assert changed["retrain"]["fingerprint"] != first["retrain"]["fingerprint"]

    toy_recipe["evaluate"]["batch_size"] = 8  # evaluation settings: re-evaluate, do not retrain
    evaluated = run_recipe(load_recipe(write_recipe(toy_recipe))).data["stages"]
    assert evaluated["train"]["started"] == first["train"]["started"]
    assert evaluated["train"]["eval_fingerprint"] != first["train"]["eval_fingerprint"]


def test_rerunning_a_stage_makes_later_results_stale(toy_recipe, write_recipe, tmp_path):
    path = write_recipe(two_stage(toy_recipe))
    first = run_recipe(load_recipe(path)).data["stages"]
    only = run_recipe(load_recipe(path), only=["train"]).data  # a new train model; retrain was built on the old one
    assert only["stages"]["retrain"]["status"] == "stale" and "'train' ran again" in only["stages"]["retrain"]["reason"]
    assert only["selection"]["stage"] == "train"  # a stale result is no candidate
    again = run_recipe(load_recipe(path)).data["stages"]
    assert again["retrain"]["fingerprint"] != first["retrain"]["fingerprint"]
    assert again["retrain"]["started"] > again["train"]["finished"]


def test_removed_stage_is_neither_reported_nor_selected(toy_recipe, write_recipe, tmp_path):
    run_recipe(load_recipe(write_recipe(two_stage(toy_recipe))))
    toy_recipe["stages"].pop()
    manifest = run_recipe(load_recipe(write_recipe(toy_recipe)))
    assert [name for name, _ in manifest.ordered()] == ["train"]
    assert manifest.data["selection"]["stage"] == "train"


def test_only_from_and_fresh(toy_recipe, write_recipe, tmp_path):
    path = write_recipe(two_stage(toy_recipe))
    recipe = load_recipe(path)
    with pytest.raises(PlanError, match="stage 'train' has no up-to-date result"):
        run_recipe(recipe, only=["retrain"])
    first = run_recipe(recipe).data["stages"]
    only = run_recipe(recipe, only=["retrain"]).data["stages"]
    assert only["train"]["started"] == first["train"]["started"]
    assert only["retrain"]["started"] > first["retrain"]["finished"]
    from_ = run_recipe(recipe, from_="train").data["stages"]
    assert from_["train"]["started"] > only["retrain"]["finished"]
    with pytest.raises(PlanError, match="no stage named 'nope'.*train, retrain"):
        run_recipe(recipe, only=["nope"])
    fresh = run_recipe(recipe, fresh=True).data["stages"]
    assert fresh["train"]["started"] > from_["retrain"]["finished"]


def test_interrupted_stage_leaves_nothing_trusted(toy_recipe, write_recipe, tmp_path, monkeypatch):
    path = write_recipe(toy_recipe)
    real = REGISTRY["train"]

    def interrupted(cfg, ctx):
        (ctx.out_dir / "model.safetensors").write_bytes(b"half written")
        raise KeyboardInterrupt

    monkeypatch.setitem(REGISTRY, "train", Stage(TrainConfig, interrupted, distributed=True))
    with pytest.raises(KeyboardInterrupt):
        run_recipe(load_recipe(path))
    assert not (tmp_path / "run" / "train").exists()
    assert manifest_of(tmp_path)["stages"]["train"]["status"] == "running"

    monkeypatch.setitem(REGISTRY, "train", real)
    manifest = run_recipe(load_recipe(path))
    assert manifest.stage("train")["status"] == "done"
    assert not (tmp_path / "run" / "train.partial").exists()
    assert (tmp_path / "run" / "train" / "model.safetensors").stat().st_size > 1000


def test_failed_stage_is_recorded_and_named(toy_recipe, write_recipe, tmp_path, monkeypatch):
    def broken(cfg, ctx):
        raise ValueError("out of coffee")

    monkeypatch.setitem(REGISTRY, "train", Stage(TrainConfig, broken, distributed=True))
    with pytest.raises(StageError, match="stage 'train' failed: ValueError: out of coffee"):
        run_recipe(load_recipe(write_recipe(toy_recipe)))
    entry = manifest_of(tmp_path)["stages"]["train"]
    assert entry["status"] == "failed" and "out of coffee" in entry["error"]
    assert not (tmp_path / "run" / "train.partial").exists()


def test_disabled_stage_is_recorded_not_run(toy_recipe, write_recipe, tmp_path):
    two_stage(toy_recipe)["stages"][1]["enabled"] = False
    manifest = run_recipe(load_recipe(write_recipe(toy_recipe)))
    assert manifest.stage("retrain")["status"] == "disabled"
    assert not (tmp_path / "run" / "retrain").exists()
    assert manifest.data["selection"]["stage"] == "train"
