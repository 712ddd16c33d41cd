"""A real tiny recipe run (train -> package): the model store holds the selected PyTorch model, the service
serves it, and `toolkit push` uploads it with a card (only the Hub's HTTP calls are replaced)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import requests
from typer.testing import CliRunner

from toolkit.cli import app
from toolkit.pipeline import run_recipe
from toolkit.recipe import load_recipe

TOKEN = "hf_testsecretTOKEN0123456789"


@pytest.fixture
def packaged_run(toy_recipe, write_recipe, tmp_path):
    toy_recipe["stages"].append({"type": "package", "model_name": "toy-pt"})
    manifest = run_recipe(load_recipe(write_recipe(toy_recipe)))
    return tmp_path / "run", manifest


@pytest.mark.slow
def test_recipe_packages_pytorch_and_service_serves_it(packaged_run, tmp_path):
    import bentoml

    from toolkit.runtime import load_model
    from toolkit.serving.launch import serving

    run_dir, manifest = packaged_run
    info = manifest.stage("package")["info"]
    assert info["format"] == "pytorch" and info["stage"] == "train" and info["tag"].startswith("toy-pt:")
    stored = bentoml.models.get(info["tag"])
    assert stored.info.labels["toolkit"] == "classifier"
    assert stored.info.metadata["labels"] == ["negative", "positive"]
    assert stored.info.metadata["evaluation"]["accuracy"] == manifest.stage("train")["evaluation"]["accuracy"]
    assert (stored.path_of("model.safetensors")) and (run_dir / "train" / "model.safetensors").is_file()

    texts = ["the movie was great", "awful and dull", "a superb story", "the plot was poor"]
    own = load_model(run_dir / "train", "pytorch", 16, 1, "cpu").logits(texts).argmax(-1).tolist()
    with serving(log=tmp_path / "serve.log") as url:  # no TOOLKIT_MODEL: the newest packaged model
        answer = requests.post(f"{url}/classify_batch", json={"text": texts}, timeout=30).json()
        single = requests.post(f"{url}/classify", json={"text": texts[0]}, timeout=30).json()
    assert answer["categories"] == own
    assert answer["labels"] == [["negative", "positive"][i] for i in own]
    assert single["categories"] == own[0]


def test_rerun_packages_again_when_the_stored_model_was_deleted(packaged_run, toy_recipe, write_recipe):
    import bentoml

    run_dir, manifest = packaged_run
    tag = manifest.stage("package")["info"]["tag"]
    again = run_recipe(load_recipe(write_recipe(toy_recipe)))
    assert again.stage("package")["info"]["tag"] == tag  # unchanged and still stored: skipped
    bentoml.models.delete(tag)
    renewed = run_recipe(load_recipe(write_recipe(toy_recipe)))
    new_tag = renewed.stage("package")["info"]["tag"]
    assert new_tag != tag and bentoml.models.get(new_tag)


class FakeCommit:
    commit_url = "https://huggingface.co/user/toy/commit/abc"


def test_push_uploads_files_and_card_without_leaking_the_token(toy_recipe, write_recipe, tmp_path, monkeypatch):
    from huggingface_hub import HfApi, ModelCard, constants

    run_recipe(load_recipe(write_recipe(toy_recipe)))
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_HUB_OFFLINE")
    calls = {}
    monkeypatch.setattr(HfApi, "create_repo", lambda self, repo_id, **kw: calls.setdefault("repo", (repo_id, kw)))

    def create_commit(self, repo_id, operations, **kw):
        calls["files"] = {op.path_in_repo: op for op in operations}
        return FakeCommit()

    monkeypatch.setattr(HfApi, "create_commit", create_commit)
    runner = CliRunner()
    dry = runner.invoke(app, ["push", str(tmp_path / "run"), "--repo-id", "user/toy", "--dry-run"])
    assert dry.exit_code == 0, dry.output
    assert calls == {}  # a dry run neither creates the repo nor commits
    listed = {line.split()[0] for line in dry.output.splitlines()[1:]}

    result = runner.invoke(app, ["push", str(tmp_path / "run"), "--repo-id", "user/toy", "--private"])
    assert result.exit_code == 0, result.output
    assert calls["repo"] == ("user/toy", {"repo_type": "model", "private": True, "exist_ok": True})
    assert set(calls["files"]) == listed
    assert {"model.safetensors", "config.json", "tokenizer.json", "README.md"} <= listed
    card = calls["files"]["README.md"].path_or_fileobj.decode()
    assert card.startswith("---\n")
    meta = ModelCard(card).data  # the Hub's own parser and model-index reader
    assert meta.library_name == "transformers" and meta.pipeline_tag == "text-classification"
    assert {"text-classification", "toolkit"} <= set(meta.tags) and meta.base_model is None  # a local model
    results = {r.metric_type: r for r in meta.eval_results}
    assert set(results) == {"accuracy", "f1"} and results["f1"].metric_config == "macro"
    entry = json.loads((tmp_path / "run" / "manifest.json").read_text())["stages"]["train"]["evaluation"]
    assert results["accuracy"].metric_value == round(entry["accuracy"], 4)
    assert results["accuracy"].dataset_split == "test" and results["accuracy"].task_type == "text-classification"
    assert "`negative`, `positive`" in card and "| train | train |" in card
    assert "AutoModelForSequenceClassification" in card and "/classify" in card and "name: toy" in card
    for text in (dry.output, result.output, card):
        assert TOKEN not in text
    config = json.loads((tmp_path / "run" / "train" / "config.json").read_text())
    assert config["id2label"] == {"0": "negative", "1": "positive"}


def test_push_failures_are_one_clear_line(toy_recipe, write_recipe, tmp_path, monkeypatch):
    import requests as http
    from huggingface_hub import HfApi, constants

    run_recipe(load_recipe(write_recipe(toy_recipe)))
    runner = CliRunner()
    args = ["push", str(tmp_path / "run"), "--repo-id", "user/toy"]
    offline = runner.invoke(app, args)  # conftest sets HF_HUB_OFFLINE=1
    assert offline.exit_code == 1 and "HF_HUB_OFFLINE" in offline.output and "Traceback" not in offline.output

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr("toolkit.hub._stored_token", lambda: None)
    no_token = runner.invoke(app, args)
    assert no_token.exit_code == 1 and "no Hugging Face token" in no_token.output

    monkeypatch.setenv("HF_TOKEN", TOKEN)
    monkeypatch.setattr("toolkit.hub._stored_token", lambda: TOKEN)

    def unreachable(self, *a, **kw):
        raise http.ConnectionError(f"Failed to resolve huggingface.co (token {TOKEN})")

    monkeypatch.setattr(HfApi, "create_repo", unreachable)
    failed = runner.invoke(app, args)
    assert failed.exit_code == 1, failed.output
    assert "upload to user/toy failed: ConnectionError" in failed.output
    assert TOKEN not in failed.output and "Traceback" not in failed.output

    missing = runner.invoke(app, ["push", str(tmp_path), "--repo-id", "user/toy"])
    assert missing.exit_code == 1 and "no selected model" in missing.output
    bad = runner.invoke(app, args[:2] + ["--repo-id", "not a repo"])
    assert bad.exit_code == 1 and "user/name" in bad.output


def test_card_metadata_names_hub_base_model_dataset_license_and_language(tmp_path):
    from huggingface_hub import ModelCard

    from toolkit.hub import model_card
    from toolkit.manifest import Artifact, Manifest

    evaluation = {"split": "test", "accuracy": 0.91234, "macro_f1": 0.9}
    manifest = Manifest(tmp_path, {
        "recipe": {"name": "r", "model": {"name": "google-bert/bert-base-uncased"},
                   "data": {"format": "hub", "path": "stanfordnlp/sst2"},
                   "card": {"license": "apache-2.0", "language": ["en"]}},
        "data": {"label_names": ["neg", "pos"]},
        "stages": {"quantize": {"type": "quantize", "evaluation": evaluation}},
    })  # fmt: skip
    card = ModelCard(model_card(manifest, Artifact(tmp_path, "onnx", "quantize"), "user/r"))
    assert card.data.base_model == "google-bert/bert-base-uncased" and card.data.datasets == ["stanfordnlp/sst2"]
    assert card.data.license == "apache-2.0" and card.data.language == ["en"]
    assert {"onnx", "int8"} <= set(card.data.tags) and card.data.library_name == "transformers"
    accuracy = next(r for r in card.data.eval_results if r.metric_type == "accuracy")
    assert accuracy.dataset_type == "stanfordnlp/sst2" and accuracy.metric_value == 0.9123


@pytest.mark.slow
def test_onnx_selection_is_pushed_in_the_hub_layout_that_every_loader_reads(toy_recipe, write_recipe, tmp_path):
    """PyTorch weights at the root, the ONNX chain under onnx/: transformers, pipeline and Optimum load the same
    pushed folder (the upload is written to disk here instead of the Hub)."""
    import numpy as np
    from optimum.onnxruntime import ORTModelForSequenceClassification
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, pipeline

    from toolkit.hub import plan_upload
    from toolkit.manifest import Manifest

    recipe = {**toy_recipe, "stages": [*toy_recipe["stages"], {"type": "export"}, {"type": "optimize"},
                                       {"type": "quantize", "instruction_set": "avx2"}],
              "select": {"max_accuracy_drop": 100}}  # fmt: skip
    run_recipe(load_recipe(write_recipe(recipe)))
    manifest = Manifest.load(tmp_path / "run")
    upload = plan_upload(manifest, "user/toy")
    assert upload.artifact.format == "onnx"
    # `toolkit push --local-dir` writes exactly what would be uploaded, and nothing into a folder with files in it.
    repo = tmp_path / "repo"
    pushed = CliRunner().invoke(app, ["push", str(tmp_path / "run"), "--repo-id", "user/toy", "--local-dir", str(repo)])
    assert pushed.exit_code == 0, pushed.output
    names = {n for n, _ in upload.files}
    assert {p.relative_to(repo).as_posix() for p in repo.rglob("*") if p.is_file()} == names | {"README.md"}
    assert (repo / "README.md").read_text() == upload.card
    again = CliRunner().invoke(app, ["push", str(tmp_path / "run"), "--repo-id", "user/toy", "--local-dir", str(repo)])
    assert again.exit_code != 0 and "not an empty folder" in again.output
    assert {"model.safetensors", "config.json", "tokenizer.json", "onnx/model.onnx", "onnx/config.json"} <= names
    chosen = {"export": "model.onnx", "optimize": "model_optimized.onnx", "quantize": "model_quantized.onnx"}[
        manifest.selection["stage"]
    ]
    assert f"onnx/{chosen}" in names and f'file_name="{chosen}"' in upload.card
    where = upload.card.split("## Where each file runs")[1].split("## Recipe")[0]
    assert [f"onnx/{n}" in where for n in ("model.onnx", "model_optimized.onnx", "model_quantized.onnx")] == [
        f"onnx/{n}" in names for n in ("model.onnx", "model_optimized.onnx", "model_quantized.onnx")
    ]
    assert ('transformers.js (`dtype: "q8"`' in where) == ("onnx/model_quantized.onnx" in names)
    assert 'transformers.js (`dtype: "fp32"`' in where and "transformers 4.57" in where
    texts = ["the movie was good", "awful plot and it was dull", "a lovely story"]
    tokenizer = AutoTokenizer.from_pretrained(repo)
    batch = tokenizer(texts, padding=True, return_tensors="pt")
    torch_ids = AutoModelForSequenceClassification.from_pretrained(repo)(**batch).logits.argmax(-1).tolist()
    ort = ORTModelForSequenceClassification.from_pretrained(repo, subfolder="onnx", file_name=chosen)
    ort_ids = np.asarray(ort(**tokenizer(texts, padding=True, return_tensors="np")).logits).argmax(-1).tolist()
    labels = [r["label"] for r in pipeline("text-classification", model=str(repo))(texts)]
    assert labels == [ort.config.id2label[i] for i in torch_ids]
    agreement = np.mean(np.array(torch_ids) == np.array(ort_ids))
    assert agreement >= 2 / 3  # an INT8 graph may differ from its PyTorch ancestor on a near-boundary text
    # Text Embeddings Inference's ONNX backend reads the same repo: its FP32 `onnx/model.onnx` (the export).
    assert tei_ort_backend_classes(repo, texts) == torch_ids

    # The bento serves the pushed repo (TOOLKIT_HUB_MODEL: a Hub id, or as here a folder in the same layout).
    from toolkit.runtime import load_model
    from toolkit.serving.launch import serving

    served_graph = load_model(Path(manifest.stage(manifest.selection["stage"])["output"]["path"]), "onnx", 16, 1)
    expected = served_graph.logits(texts).argmax(-1).tolist()
    with serving({"TOOLKIT_HUB_MODEL": str(repo)}, log=tmp_path / "serve.log") as url:
        answers = requests.post(f"{url}/classify_batch", json={"text": texts}, timeout=30).json()
        tei = requests.post(f"{url}/predict", json={"inputs": texts[0]}, timeout=30).json()
    assert answers["categories"] == expected and answers["labels"] == [ort.config.id2label[i] for i in expected]
    assert tei[0]["label"] == answers["labels"][0]


def tei_ort_backend_classes(repo: Path, texts: list[str]) -> list[int]:
    """What Text Embeddings Inference's `ort` backend (backends/ort/src/lib.rs) does with a model repo, step by
    step, in Python (TEI itself is a Rust server that cannot be installed here): `model.onnx` at the root, else
    `onnx/model.onnx`; `config.json` with `hidden_size` and `num_hidden_layers` and a `*ForSequenceClassification`
    architecture (a classifier); `tokenizer.json` at the root; inputs `input_ids`, `attention_mask`, and
    `token_type_ids`/`position_ids` when the graph takes them, padded on the right with `pad_token_id`; the output
    named `logits`, float32; one session at graph optimization level 3."""
    import numpy as np
    import onnxruntime as ort
    from tokenizers import Tokenizer

    graph = repo / "model.onnx" if (repo / "model.onnx").exists() else repo / "onnx" / "model.onnx"
    config = json.loads((repo / "config.json").read_text())
    assert isinstance(config["hidden_size"], int) and isinstance(config["num_hidden_layers"], int)
    assert any(a.endswith("ForSequenceClassification") for a in config["architectures"]) and config["id2label"]
    tokenizer = Tokenizer.from_file(str(repo / "tokenizer.json"))
    tokenizer.no_padding()
    encodings = [tokenizer.encode(text) for text in texts]
    width = max(len(e.ids) for e in encodings)
    pad = config.get("pad_token_id") or 0
    rows = {"input_ids": [e.ids + [pad] * (width - len(e.ids)) for e in encodings],
            "attention_mask": [[1] * len(e.ids) + [0] * (width - len(e.ids)) for e in encodings],
            "token_type_ids": [e.type_ids + [0] * (width - len(e.ids)) for e in encodings],
            "position_ids": [list(range(width)) for _ in encodings]}  # fmt: skip
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    session = ort.InferenceSession(str(graph), options, providers=["CPUExecutionProvider"])
    wanted = {i.name for i in session.get_inputs()}
    inputs = {k: np.asarray(v, dtype=np.int64) for k, v in rows.items() if k in wanted}
    (logits,) = session.run(["logits"], inputs)
    assert logits.dtype == np.float32
    return logits.argmax(-1).tolist()


def test_hub_model_errors_say_what_is_wrong(tmp_path, monkeypatch):
    from toolkit.serving.hub_model import HubModelError, hub_bundle

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(HubModelError, match=r"TOOLKIT_HUB_MODEL='nobody/nothing' could not be fetched"):
        hub_bundle("nobody/nothing", tmp_path / "b1")
    repo = tmp_path / "repo"
    (repo / "onnx").mkdir(parents=True)
    (repo / "onnx" / "model.onnx").write_bytes(b"")
    (repo / "onnx" / "config.json").write_text(json.dumps({"id2label": {"0": "a", "1": "b"}}))
    with pytest.raises(HubModelError, match=r"TOOLKIT_HUB_ONNX='model_int8.onnx' is not in .*\['model.onnx'\]"):
        hub_bundle(str(repo), tmp_path / "b2", onnx_name="model_int8.onnx")
    bundle = hub_bundle(str(repo), tmp_path / "b3")
    meta = json.loads((bundle / "toolkit.json").read_text())
    assert meta["labels"] == ["a", "b"] and meta["format"] == "onnx" and meta["max_length"] == 512
    assert (bundle / "model.onnx").resolve() == (repo / "onnx" / "model.onnx").resolve()
