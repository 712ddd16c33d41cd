"""`toolkit predict`: a real tiny run's selected model scores a data file; predictions land beside it."""

from __future__ import annotations

import gzip
import json

import numpy as np
import pytest
from conftest import toy_examples, write_tsv
from typer.testing import CliRunner

from toolkit.cli import app


@pytest.fixture
def finished_run(toy_recipe, write_recipe, tmp_path):
    result = CliRunner().invoke(app, ["run", str(write_recipe(toy_recipe))])
    assert result.exit_code == 0, result.output
    return tmp_path / "run"


def predictions(path):
    lines = path.read_text(encoding="utf-8").splitlines()
    assert lines[0] == "line\tlabel\tscore\tgold"
    return [line.split("\t") for line in lines[1:]]


def test_predict_scores_a_labelled_file_like_the_evaluation(finished_run, tmp_path):
    from toolkit.manifest import Manifest
    from toolkit.runtime import load_model
    from toolkit.selection import selected_artifact

    rows = toy_examples(50, seed=7)
    file = write_tsv(tmp_path / "new.tsv", rows)
    result = CliRunner().invoke(app, ["predict", str(finished_run), str(file), "--batch-size", "8"])
    assert result.exit_code == 0, result.output
    out = predictions(tmp_path / "new.predictions.tsv")
    assert [r[0] for r in out] == [str(i) for i in range(2, 52)]  # file lines, header is line 1
    assert [r[3] for r in out] == [label for _, label in rows]

    artifact = selected_artifact(Manifest.load(finished_run).selection)
    model = load_model(artifact.path, artifact.format, 16, 1, "cpu")
    expected = model.logits_batched([t for t, _ in rows], 64).argmax(1)
    names = json.loads((artifact.path / "config.json").read_text())["id2label"]
    assert [r[1] for r in out] == [names[str(i)] for i in expected]
    accuracy = np.mean([r[1] == r[3] for r in out])
    assert f"accuracy {accuracy:.4f}" in result.output and accuracy > 0.8


def test_predict_an_unlabelled_compressed_csv(finished_run, tmp_path):
    texts = [text for text, _ in toy_examples(20, seed=3)]
    file = tmp_path / "batch.csv.gz"
    file.write_bytes(gzip.compress(("sentence\n" + "\n".join(texts) + "\n").encode()))
    output = tmp_path / "out.tsv"
    result = CliRunner().invoke(app, ["predict", str(finished_run), str(file), "--output", str(output)])
    assert result.exit_code == 0, result.output
    out = predictions(output)
    assert len(out) == 20 and all(r[3] == "" and 0.5 <= float(r[2]) <= 1 for r in out)
    assert "accuracy" not in result.output


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("index\tsentence\tlabel\n0\tgreat fun\tpositive\n1\t \tnegative\n", "bad.tsv:3: empty text"),
        ("index\tsentence\tlabel\n0\tgreat fun\tmaybe\n", "bad.tsv:2: label 'maybe' is not one of the model's"),
        ("index\ttext\n0\tgreat fun\n", "bad.tsv:1: no column 'sentence'"),
    ],
)
def test_predict_bad_rows_are_one_line_naming_file_and_line(finished_run, tmp_path, content, message):
    file = tmp_path / "bad.tsv"
    file.write_text(content, encoding="utf-8")
    result = CliRunner().invoke(app, ["predict", str(finished_run), str(file)])
    assert result.exit_code == 1 and message in result.output and "Traceback" not in result.output


def test_predict_needs_a_finished_run_and_a_file(tmp_path, finished_run):
    result = CliRunner().invoke(app, ["predict", str(finished_run), str(tmp_path / "missing.tsv")])
    assert result.exit_code == 1 and "missing.tsv: no such file" in result.output
