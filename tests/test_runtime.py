"""The one inference runtime: evaluation and the service run the same tokenizer, feeder and session, so they
give the same logits; a BERT graph whose tokenizer gives no `token_type_ids` runs through both."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from toolkit.config import EvaluateConfig, SpeedConfig
from toolkit.evaluation import evaluate_artifact
from toolkit.manifest import Artifact
from toolkit.runtime import Tokenizer, feed, load_model, resolve_threads
from toolkit.serving.bundle import write_bundle
from toolkit.serving.model import ServedModel

LABELS = ["negative", "positive"]
MAX_LENGTH = 16
TEXTS = [
    "the movie was great",
    "awful plot and dull actor",
    "a lovely story",
    "bad",
    " ".join(["very"] * 50) + " superb",  # longer than MAX_LENGTH: truncated alike everywhere
    "电影 很 好 看",
]


def classifier(tiny_model: Path, dest: Path, input_names: list[str] | None = None) -> Path:
    """A two-label classifier on the tiny BERT; `input_names` overrides what its tokenizer returns."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    extra = {"model_input_names": input_names} if input_names else {}
    AutoModelForSequenceClassification.from_pretrained(
        tiny_model, num_labels=2, id2label=dict(enumerate(LABELS)), label2id={n: i for i, n in enumerate(LABELS)}
    ).save_pretrained(dest)
    AutoTokenizer.from_pretrained(tiny_model, **extra).save_pretrained(dest)
    return dest


def exported(pytorch: Path, work: Path) -> Path:
    from toolkit.config import ExportConfig
    from toolkit.stages import export
    from toolkit.stages.base import StageContext

    out = work / "export"
    out.mkdir(parents=True)
    source = Artifact(pytorch, "pytorch", "train")
    export.run(ExportConfig(type="export"), StageContext(run_dir=work, out_dir=out, source=source, device="cpu"))
    return out


@pytest.fixture
def data(toy_data, tmp_path):
    from toolkit.data import prepare_data
    from toolkit.recipe import parse_recipe

    recipe = {
        "name": "t",
        "data": {"train": str(toy_data), "split": {"validation": 0.2, "test": 0.2, "seed": 0}},
        "model": {"name": "org/unused"},
        "stages": [{"type": "train"}],
    }
    return prepare_data(parse_recipe(recipe, tmp_path).data, tmp_path / "run")


def evaluation_logits(artifact: Artifact, data, tmp_path: Path, batch_size: int) -> np.ndarray:
    cfg = EvaluateConfig(batch_size=batch_size, speed=SpeedConfig(enabled=False, threads=1))
    logits_file = tmp_path / f"{artifact.stage}.logits.npy"
    evaluate_artifact(artifact, data, cfg, MAX_LENGTH, logits_file, device="cpu")
    return np.load(logits_file)


def bundle(artifact: Artifact, dest: Path) -> Path:
    meta = {"format": artifact.format, "stage": artifact.stage, "labels": LABELS, "max_length": MAX_LENGTH}
    write_bundle(artifact, dest, meta)
    return dest


def test_tokenizer_matches_transformers(tiny_model):
    from transformers import AutoTokenizer

    ours = Tokenizer(tiny_model, MAX_LENGTH)(TEXTS)
    theirs = AutoTokenizer.from_pretrained(tiny_model)(
        TEXTS, padding=True, truncation=True, max_length=MAX_LENGTH, return_tensors="np"
    )
    assert sorted(ours) == sorted(theirs.keys())
    for name, array in ours.items():
        np.testing.assert_array_equal(array, theirs[name])
    assert ours["input_ids"].shape[1] == MAX_LENGTH


@pytest.mark.parametrize(
    ("template", "constant"), [(None, 0), ("[CLS]:1 $A:1 [SEP]:1", 1), ("[CLS]:0 $A:1 [SEP]:0", None)]
)
def test_tokenizer_pads_as_encode_batch_with_any_pad_id(tiny_model, tmp_path, template, constant):
    """The serial encoding pads by hand: the same arrays as tokenizers' own batch padding, with a pad token
    whose id is not 0, on texts of every length, truncated ones included, from a tokenizer.json that pads to a
    fixed length, whether a text's type ids are all 0 (BERT), all another id, or mixed."""
    from tokenizers import Tokenizer as FastTokenizer
    from tokenizers.processors import TemplateProcessing

    folder = tmp_path / "tok"
    shutil.copytree(tiny_model, folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**config, "pad_token": "[SEP]"}))
    reference = FastTokenizer.from_file(str(folder / "tokenizer.json"))
    saved = FastTokenizer.from_file(str(folder / "tokenizer.json"))
    saved.enable_padding(length=40)  # a tokenizer.json that pads every text to a fixed length
    if template:
        specials = [(t, saved.token_to_id(t)) for t in ("[CLS]", "[SEP]")]
        reference.post_processor = TemplateProcessing(single=template, special_tokens=specials)
        saved.post_processor = reference.post_processor
    saved.save(str(folder / "tokenizer.json"))
    tokenizer = Tokenizer(folder, 12)
    assert tokenizer.pad_id != 0 and tokenizer.constant_type_ids == constant
    texts = ["a", "", "great film " * 20, *TEXTS]
    ours = tokenizer(texts)
    reference.enable_truncation(12)
    reference.enable_padding(pad_id=tokenizer.pad_id, pad_token="[SEP]")
    theirs = reference.encode_batch(texts)
    np.testing.assert_array_equal(ours["input_ids"], [e.ids for e in theirs])
    np.testing.assert_array_equal(ours["attention_mask"], [e.attention_mask for e in theirs])
    np.testing.assert_array_equal(ours["token_type_ids"], [e.type_ids for e in theirs])
    assert ours["attention_mask"][1].sum() == 2 and (ours["input_ids"][1, 2:] == tokenizer.pad_id).all()


@pytest.mark.parametrize("fmt", ["pytorch", "onnx"])
def test_evaluation_and_service_give_identical_logits(fmt, tiny_model, data, tmp_path):
    folder = classifier(tiny_model, tmp_path / "pt")
    if fmt == "onnx":
        folder = exported(folder, tmp_path)
    artifact = Artifact(folder, fmt, fmt)
    evaluated = evaluation_logits(artifact, data, tmp_path, batch_size=8)

    served = ServedModel(bundle(artifact, tmp_path / "bundle"), threads=1, device="cpu")
    texts = data.texts("test")
    logits = np.concatenate([served.logits(texts[i : i + 8]) for i in range(0, len(texts), 8)])
    assert evaluated.shape == (len(texts), 2)
    np.testing.assert_array_equal(logits, evaluated)
    ids, probs = served.predict(texts[:8])
    assert ids == evaluated[:8].argmax(-1).tolist() and all(0.5 <= p <= 1 for p in probs)


def test_bert_graph_with_tokenizer_without_token_type_ids(tiny_model, data, tmp_path):
    """The shape of multilingual-e5: a BERT encoder (its graph takes token_type_ids) with a tokenizer that, like
    XLM-R's, returns only input_ids and attention_mask."""
    from transformers import AutoTokenizer

    folder = classifier(tiny_model, tmp_path / "pt", input_names=["input_ids", "attention_mask"])
    config = json.loads((folder / "tokenizer_config.json").read_text())
    assert config["model_input_names"] == ["input_ids", "attention_mask"]
    assert "token_type_ids" not in AutoTokenizer.from_pretrained(folder)(["a text"])
    assert "token_type_ids" not in Tokenizer(folder, MAX_LENGTH)(["a text"])

    onnx_folder = exported(folder, tmp_path)
    graph_inputs = load_model(onnx_folder, "onnx", MAX_LENGTH, 1, "cpu").input_names
    assert "token_type_ids" in graph_inputs  # the graph wants what the tokenizer does not give

    pytorch_logits = evaluation_logits(Artifact(folder, "pytorch", "train"), data, tmp_path, batch_size=8)
    onnx_logits = evaluation_logits(Artifact(onnx_folder, "onnx", "export"), data, tmp_path, batch_size=8)
    np.testing.assert_allclose(onnx_logits, pytorch_logits, atol=1e-4)

    served = ServedModel(bundle(Artifact(onnx_folder, "onnx", "export"), tmp_path / "bundle"), 1, "cpu")
    np.testing.assert_array_equal(served.logits(data.texts("test")[:8]), onnx_logits[:8])


def test_feeder_gives_the_graph_exactly_its_inputs():
    batch = {"input_ids": np.array([[2, 7, 3]]), "attention_mask": np.array([[1, 1, 1]])}
    fed = feed(batch, ["input_ids", "attention_mask", "token_type_ids"])
    assert list(fed) == ["input_ids", "attention_mask", "token_type_ids"]
    np.testing.assert_array_equal(fed["token_type_ids"], np.zeros((1, 3), dtype=np.int64))
    assert list(feed({**batch, "token_type_ids": batch["input_ids"]}, ["input_ids"])) == ["input_ids"]
    with pytest.raises(ValueError, match="position_ids"):
        feed(batch, ["input_ids", "position_ids"])


def test_one_thread_rule(monkeypatch):
    monkeypatch.delenv("TOOLKIT_THREADS", raising=False)
    assert resolve_threads(3) == 3
    assert resolve_threads(0) >= 1
    monkeypatch.setenv("TOOLKIT_THREADS", "5")
    assert resolve_threads(0) == 5 and resolve_threads(None) == 5 and resolve_threads(2) == 2


@pytest.mark.slow
def test_served_answers_equal_evaluation_over_http(tiny_model, data, tmp_path):
    """The real `bentoml serve` on the no-token_type_ids ONNX model: each answer is evaluation's own figure."""
    import requests

    from toolkit.runtime import softmax
    from toolkit.serving.launch import serving
    from toolkit.stages.package import save_to_store

    folder = classifier(tiny_model, tmp_path / "pt", input_names=["input_ids", "attention_mask"])
    artifact = Artifact(exported(folder, tmp_path), "onnx", "export")
    evaluated = evaluation_logits(artifact, data, tmp_path, batch_size=1)  # one text per call, as served below
    expected = softmax(evaluated.astype(np.float64))
    save_to_store(
        "no-type-ids", artifact, {"format": "onnx", "labels": LABELS, "max_length": MAX_LENGTH, "recipe": "t"}
    )
    texts = data.texts("test")[:12]
    with serving({"TOOLKIT_MODEL": "no-type-ids:latest"}, log=tmp_path / "serve.log") as url:
        for i, text in enumerate(texts):
            answer = requests.post(f"{url}/classify", json={"text": text}, timeout=30)
            assert answer.status_code == 200, answer.text
            body = answer.json()
            assert body["categories"] == int(expected[i].argmax()) and body["label"] == LABELS[body["categories"]]
            assert body["probabilities"] == float(expected[i].max())


def test_length_groups_cover_the_batch_and_pad_less():
    from toolkit.runtime.model import length_groups

    lengths = np.array([5, 60, 6, 7, 58, 5, 61, 8])
    groups = length_groups(lengths, call_cost=16)
    assert sorted(np.concatenate(groups).tolist()) == list(range(len(lengths)))
    assert [sorted(lengths[g].tolist()) for g in groups] == [[5, 5, 6, 7, 8], [58, 60, 61]]

    def padded(gs):
        return sum(len(g) * lengths[g].max() + 16 for g in gs)

    assert padded(groups) < padded([np.arange(len(lengths))])
    assert len(length_groups(lengths, call_cost=10_000)) == 1  # a costly call: one group
    assert len(length_groups(np.array([9, 9, 9, 9]), call_cost=0)) == 1  # nothing to gain from splitting


def test_bucketed_calls_give_each_text_its_own_padding(tiny_model, tmp_path):
    """A batch split by length equals each group run alone, padded to its own longest text."""
    folder = classifier(tiny_model, tmp_path / "pt")
    model = load_model(folder, "pytorch", MAX_LENGTH, 1, "cpu")
    bucketed = model.logits(TEXTS)
    one_by_one = np.concatenate([model.logits([t]) for t in TEXTS])
    np.testing.assert_allclose(bucketed, one_by_one, atol=1e-5)
    model.buckets = False
    np.testing.assert_allclose(model.logits(TEXTS), one_by_one, atol=1e-5)  # FP32: padding changes nothing


def test_tokenizer_without_a_pad_token_is_a_clear_error(tiny_model, tmp_path):
    import shutil

    from toolkit.runtime.tokenizer import TokenizerError

    folder = shutil.copytree(tiny_model, tmp_path / "nopad")
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config.pop("pad_token", None)
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(TokenizerError, match=r"nopad: the tokenizer has no pad token \(no pad_token in"):
        Tokenizer(folder, MAX_LENGTH)
    config["pad_token"] = "<pad>"
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(TokenizerError, match=r"its pad_token '<pad>' is not in its vocabulary"):
        Tokenizer(folder, MAX_LENGTH)


@pytest.fixture
def onnx_folder(tiny_model, tmp_path) -> Path:
    return exported(classifier(tiny_model, tmp_path / "pt"), tmp_path)


def test_logits_by_length_keep_the_input_order(onnx_folder, data):
    model = load_model(onnx_folder, "onnx", MAX_LENGTH, 1, "cpu")
    texts = list(data.texts("test")) + TEXTS
    np.testing.assert_allclose(model.logits_by_length(texts, 4), model.logits_batched(texts, 64), atol=1e-5)
    assert model.logits_by_length([], 4).shape[0] == 0


@pytest.mark.parametrize("fuse", [False, True])
def test_skip_layer_norm_fusion_is_the_sessions_choice(tiny_model, tmp_path, fuse):
    """On the INT8 graph a recipe makes (O2 without SkipLayerNorm, then INT8), the session fuses the residual
    Add + LayerNormalization only when told to."""
    import onnx

    from toolkit.runtime import onnx_file, ort_session
    from toolkit.stages.chain import int8_from_pytorch
    from toolkit.stages.onnx_common import op_counts, unpacked

    int8 = onnx_file(int8_from_pytorch(classifier(tiny_model, tmp_path / "pt"), tmp_path))
    assert "SkipLayerNormalization" not in op_counts(int8)
    ort_session(int8, 1, fuse_skip_layer_norm=fuse, save_optimized=tmp_path / "ran.onnx")
    # The graph is token-packed: the fusion is decided in the If's plain branch (the packed branch's Add and
    # LayerNormalization work on [tokens, hidden], which ONNX Runtime's SkipLayerNorm fusion leaves alone).
    ran = unpacked(onnx.load(str(tmp_path / "ran.onnx")).graph)
    assert ("SkipLayerNormalization" in {node.op_type for node in ran.node}) is fuse


def test_tuning_measures_every_combination_and_keeps_the_default_unless_beaten(onnx_folder, data):
    from toolkit.runtime import available_cores, cpu_model
    from toolkit.stages.tuning import candidates, tune_onnx

    tuned = tune_onnx(Artifact(onnx_folder, "onnx", "export"), MAX_LENGTH, data.texts("validation"), rounds=2)
    rows = tuned["candidates"]
    assert [{k: r[k] for k in tuned["choice"]} for r in rows] == candidates(available_cores())
    assert rows[0]["threads"] == available_cores() and rows[0]["spin"] and not rows[0]["fuse_skip_layer_norm"]
    assert all(r["same_answers"] for r in rows) and tuned["cpu"] == cpu_model()
    chosen = next(r for r in rows if {k: r[k] for k in tuned["choice"]} == tuned["choice"])
    assert tuned["default_kept"] == (chosen is rows[0])
    assert tuned["default_kept"] or chosen["speedup_min"] > 1.0


def test_service_uses_measured_settings_only_on_the_cpu_they_were_measured_on():
    from toolkit.runtime import available_cores, cpu_model
    from toolkit.serving.model import session_settings

    choice = {"threads": 1, "spin": False, "fuse_skip_layer_norm": True}
    here = {"runtime": {"choice": choice, "cpu": cpu_model(), "cores": available_cores(), "date": "2026-11-23"}}
    settings, source = session_settings(here, env={})
    assert settings == {**choice, "lanes": 1} and "measured on this CPU" in source

    elsewhere = {"runtime": {**here["runtime"], "cpu": "Some Other CPU"}}
    settings, source = session_settings(elsewhere, env={})
    assert settings == {"threads": available_cores(), "lanes": 1, "spin": True, "fuse_skip_layer_norm": None}
    assert "Some Other CPU" in source and "re-run `package`" in source

    settings, source = session_settings(here, workers=1, env={"TOOLKIT_ORT_SPIN": "1", "TOOLKIT_THREADS": "4"})
    assert settings == {"threads": 4, "lanes": 1, "spin": True, "fuse_skip_layer_norm": True}
    assert "TOOLKIT_ORT_SPIN from the environment" in source
    assert session_settings(here, env={"TOOLKIT_LANES": "2"})[0]["lanes"] == 2
    assert session_settings({}, workers=2, env={"TOOLKIT_THREADS": "4"})[0]["threads"] == 2
    assert session_settings(here, env={"TOOLKIT_DEVICE": "cuda"})[0]["fuse_skip_layer_norm"] is None
