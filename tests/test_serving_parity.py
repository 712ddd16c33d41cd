"""The serving-parity gate of `package`: the evaluation split replayed through the service's own path (the stored
folder as the service loads it, its micro-batcher, many concurrent clients) must answer every text as evaluation
did; a model whose answers depend on what shares its call is refused and not stored."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from toolkit.pipeline import StageError, run_recipe
from toolkit.recipe import load_recipe
from toolkit.stages import REGISTRY, Stage, StageResult
from toolkit.stages.base import Artifact
from toolkit.stages.serving_parity import client_requests, service_settings

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt")


def toolkit_models() -> list[str]:
    import bentoml

    return [str(m.tag) for m in bentoml.models.list() if m.info.labels.get("toolkit") == "classifier"]


def with_big_test_split(recipe: dict) -> dict:
    """168 of the 240 toy texts in the test split: several rounds of requests from the 32 clients."""
    recipe["data"]["split"] = {"validation": 0.1, "test": 0.7, "seed": 0}
    return recipe


def test_packaged_model_is_served_as_evaluated_and_the_figure_is_recorded(
    toy_recipe, write_recipe, tmp_path, monkeypatch
):
    from toolkit.hub import model_card
    from toolkit.report import markdown

    toy_recipe["stages"] = [
        {"type": "train", "epochs": 2, "batch_size": 16},
        {"type": "package", "model_name": "toy-parity"},
    ]
    with_big_test_split(toy_recipe)
    # As the service would read it: one torch thread (two threads' calls on a busy 2-core machine took 160 ms).
    monkeypatch.setenv("TOOLKIT_THREADS", "1")
    manifest = run_recipe(load_recipe(write_recipe(toy_recipe)))
    info = manifest.stage("package")["info"]
    record = info["serving_parity"]
    texts = manifest.stage("train")["evaluation"]["n"]
    assert record["passed"] and record["agreement"] == 1.0 and record["changed"] == []
    assert record["texts"] == texts == 168 and record["split"] == "test"
    assert record["max_logit_difference"] < 1e-4
    assert record["clients"] == 32 and record["requests"] > 40
    assert record["max_batch_size"] == service_settings()["max_batch_size"] and record["fill_wait"] == 0.25
    sizes = record["call_sizes"]
    # Concurrent clients' requests were merged into calls of several sizes.
    assert record["model_calls"] < record["requests"] and len(sizes["calls_by_size"]) >= 2
    assert sum(sizes["calls_by_size"].values()) == record["model_calls"]
    assert record["session"]["threads"] == 1 and "TOOLKIT_THREADS" in record["session"]["source"]
    assert record["seconds"] > 0
    assert info["tag"] in toolkit_models()
    line = f"Served as evaluated: 100.00 % of {texts} test texts"
    assert line in markdown(manifest, None, {})
    assert line in model_card(manifest, Artifact(tmp_path / "run" / "train", "pytorch", "train"), "user/toy")


def test_clients_get_every_text_once_in_requests_of_one_to_eight():
    plan = client_requests(1000, 32, seed=3)
    requests = [index for client in plan for _, index in client]
    assert sorted(np.concatenate(requests).tolist()) == list(range(1000))
    assert {1, 2, 8} <= {len(r) for r in requests} and max(map(len, requests)) == 8 and len(plan) == 32
    pauses = [pause for client in plan for pause, _ in client]
    assert min(pauses) == 0 and max(pauses) > 32 and sum(p < 1 for p in pauses) > len(pauses) / 4
    again = client_requests(1000, 32, seed=3)  # seeded: the same order, requests and pauses
    assert [(p, r.tolist()) for c in plan for p, r in c] == [(p, r.tolist()) for c in again for p, r in c]


def batch_dependent_graph(folder: Path, tokenizer_from: Path) -> Path:
    """A real ONNX model folder whose logits depend on the other texts of its call: each text's mean token id
    against the mean of the call's texts, `[s - mean, mean - s]` (alone, a text gets [0, 0])."""
    import onnx
    from onnx import TensorProto, helper

    inputs = [helper.make_tensor_value_info(name, TensorProto.INT64, ["batch", "sequence"])
              for name in ("input_ids", "attention_mask")]  # fmt: skip
    nodes = [
        helper.make_node("Cast", ["input_ids"], ["ids"], to=TensorProto.FLOAT),
        helper.make_node("Cast", ["attention_mask"], ["mask"], to=TensorProto.FLOAT),
        helper.make_node("Mul", ["ids", "mask"], ["kept"]),
        helper.make_node("ReduceSum", ["kept", "axis1"], ["total"], keepdims=1),
        helper.make_node("ReduceSum", ["mask", "axis1"], ["count"], keepdims=1),
        helper.make_node("Div", ["total", "count"], ["score"]),
        helper.make_node("ReduceMean", ["score"], ["call_mean"], axes=[0], keepdims=1),  # across the call
        helper.make_node("Sub", ["score", "call_mean"], ["above"]),
        helper.make_node("Neg", ["above"], ["below"]),
        helper.make_node("Concat", ["above", "below"], ["logits"], axis=1),
    ]
    axis1 = helper.make_tensor("axis1", TensorProto.INT64, [1], [1])
    output = helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 2])
    graph = helper.make_graph(nodes, "batch_dependent", inputs, [output], initializer=[axis1])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(model, full_check=True)
    folder.mkdir(parents=True, exist_ok=True)
    onnx.save(model, folder / "model.onnx")
    for name in TOKENIZER_FILES:
        if (tokenizer_from / name).is_file():
            shutil.copy2(tokenizer_from / name, folder / name)
    config = {"model_type": "bert", "id2label": {"0": "negative", "1": "positive"},
              "label2id": {"negative": 0, "positive": 1}}  # fmt: skip
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def test_a_model_whose_answer_depends_on_its_call_fails_and_is_not_stored(
    toy_recipe, write_recipe, tmp_path, tiny_model, monkeypatch
):
    """The model a `train` stage hands on is the hand-built graph; it is evaluated, selected and packaged like any
    model, and the replay through the service's micro-batcher gives some texts another class."""
    from toolkit.manifest import Manifest

    def made(cfg, ctx):
        batch_dependent_graph(ctx.out_dir, tiny_model)
        return StageResult(Artifact(ctx.out_dir, "onnx", cfg.name), {})

    monkeypatch.setitem(REGISTRY, "train", Stage(REGISTRY["train"].config, made, distributed=True))
    toy_recipe["stages"].append({"type": "package", "model_name": "toy-batch-dependent", "tune_runtime": False})
    with_big_test_split(toy_recipe)
    before = toolkit_models()
    with pytest.raises(StageError) as failed:
        run_recipe(load_recipe(write_recipe(toy_recipe)))
    message = str(failed.value)
    assert "stage 'package' failed: ServingParityError: serving parity:" in message
    changed = int(message.split("serving parity: ")[1].split(" of ")[0])
    assert 0 < changed <= 168 and " of 168 test texts got another class" in message
    assert "the model was not stored" in message and "serving_parity: false" in message
    manifest = Manifest.load(tmp_path / "run")
    entry = manifest.stage("package")
    assert entry["status"] == "failed" and "ServingParityError" in entry["error"]
    texts = manifest.data["data"]["path"]
    shown = [line for line in message.splitlines() if line.startswith("  #")]
    assert 1 <= len(shown) <= min(changed, 5)
    assert all("evaluated negative" in line or "evaluated positive" in line for line in shown)
    from toolkit.data import PreparedData

    split = PreparedData(Path(texts), ["negative", "positive"], "").texts("test")
    index = int(shown[0].split("#")[1].split()[0])
    assert repr(split[index]) in shown[0]  # the error names the text itself
    assert toolkit_models() == before  # nothing was stored: not the newest toolkit model

    toy_recipe["stages"][-1]["serving_parity"] = False  # the gate turned off: stored as before
    manifest = run_recipe(load_recipe(write_recipe(toy_recipe)))
    info = manifest.stage("package")["info"]
    assert "serving_parity" not in info and info["tag"] in toolkit_models()


def test_the_replay_reads_the_service_settings_the_service_reads(tmp_path):
    """The gate reads TOOLKIT_MAX_BATCH_SIZE, TOOLKIT_FILL_WAIT and TOOLKIT_WORKERS again (importing the service
    would look up a model in the store): both must agree, by default and when set."""
    code = "import toolkit.serving.service as s; print(s.MAX_BATCH_SIZE, s.FILL_WAIT, s.WORKERS)"
    for env in ({}, {"TOOLKIT_MAX_BATCH": "100", "TOOLKIT_FILL_WAIT": "0.5", "TOOLKIT_WORKERS": "2"},
                {"TOOLKIT_MAX_BATCH_SIZE": "16"}):  # fmt: skip
        run_env = {**os.environ, "TOOLKIT_HUB_MODEL": str(tmp_path), **env}
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=run_env, check=True)
        size, wait, workers = out.stdout.split()
        assert service_settings(env) == {"max_batch_size": int(size), "fill_wait": float(wait),
                                         "workers": int(workers)}  # fmt: skip
