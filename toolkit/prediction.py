"""`toolkit predict`: batch scoring of a data file with a run's selected model, through the runtime the service
runs. Rows stream in chunks (a file larger than memory is fine), each chunk is scored in calls of similar
length (`InferenceModel.logits_by_length`), and the predictions are written beside the file as TSV: the row's
line, the label, its probability and, when the file has the label column, the gold label (and the accuracy)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import islice
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from toolkit.data import COMPRESSED, READERS, DataError, Row, check_text
from toolkit.errors import ToolkitError
from toolkit.manifest import Manifest
from toolkit.runtime import load_model, softmax
from toolkit.selection import selected_artifact


class PredictError(ToolkitError, ValueError):
    """The run or the file cannot be scored as asked."""


@dataclass
class Predicted:
    output: Path
    rows: int
    stage: str
    accuracy: float | None


def file_format(path: Path, declared: str | None, recipe_format: str) -> str:
    """The reader of a file: `declared`, else its suffix (under any compression suffix), else the recipe's."""
    if declared:
        return declared
    suffixes = [s.lstrip(".") for s in path.suffixes if s not in COMPRESSED]
    if suffixes and suffixes[-1] in READERS:
        return suffixes[-1]
    if recipe_format in READERS:
        return recipe_format
    raise PredictError(f"{path}: cannot tell its format from its name; pass --format ({', '.join(READERS)})")


def bare_name(path: Path) -> str:
    """`reviews.test.tsv.gz` -> `reviews.test`."""
    name = Path(path.name)
    while name.suffix in COMPRESSED or name.suffix.lstrip(".") in READERS:
        name = name.with_suffix("")
    return name.name


def gold_id(row: Row, labels: list[str]) -> int:
    """A gold label as the model's class id: its name, or an integer id in range."""
    value = str(row.label).strip()
    if value in labels:
        return labels.index(value)
    if value.lstrip("-").isdigit() and 0 <= int(value) < len(labels):
        return int(value)
    raise DataError(f"{row.where}: label {row.label!r} is not one of the model's labels ({', '.join(labels)})")


def chunks(rows: Iterator[Row], size: int) -> Iterator[list[Row]]:
    while chunk := list(islice(rows, size)):
        yield chunk


def predict_file(
    run_dir: Path,
    file: Path,
    output: Path | None = None,
    fmt: str | None = None,
    batch_size: int = 64,
    threads: int | None = None,
    chunk_size: int = 8192,
) -> Predicted:
    if not file.is_file():
        raise PredictError(f"{file}: no such file")
    manifest = Manifest.load(run_dir, writable=False)
    if not manifest.selection:
        raise PredictError(f"{run_dir}: the run selected no model yet; run the recipe to its end first")
    artifact = selected_artifact(manifest.selection)
    recipe = manifest.data["recipe"]
    data_cfg = recipe["data"]
    reader = READERS[file_format(file, fmt, data_cfg["format"])]
    labels = [name for _, name in sorted(_id2label(Path(artifact.path)).items())]
    model = load_model(artifact.path, artifact.format, recipe["model"]["max_length"], threads)
    output = output or file.with_name(f"{bare_name(file)}.predictions.tsv")

    rows = reader(file, data_cfg["text_column"], data_cfg["label_column"], data_cfg.get("encoding", "utf-8"),
                  label_optional=True)  # fmt: skip
    correct = scored = graded = 0
    with output.open("w", encoding="utf-8") as out, tqdm(desc=f"predict {file.name}", unit=" texts") as bar:
        out.write("line\tlabel\tscore\tgold\n")
        for chunk in chunks(rows, chunk_size):
            texts = [check_text(r, data_cfg["text_column"]) for r in chunk]
            probs = softmax(model.logits_by_length(texts, batch_size).astype(np.float64))
            ids = probs.argmax(-1)
            for row, i, p in zip(chunk, ids, probs[np.arange(len(ids)), ids], strict=True):
                gold = "" if row.label is None else labels[gold_id(row, labels)]
                graded += bool(gold)
                correct += gold == labels[i]
                out.write(f"{row.where.rsplit(':', 1)[-1]}\t{labels[i]}\t{p:.6f}\t{gold}\n")
            scored += len(chunk)
            bar.update(len(chunk))
    return Predicted(output, scored, manifest.selection["stage"], correct / graded if graded else None)


def _id2label(folder: Path) -> dict[int, str]:
    config = folder / "config.json"
    if not config.is_file():
        raise PredictError(f"{folder}: no config.json, so the model's labels are unknown")
    return {int(k): v for k, v in json.loads(config.read_text())["id2label"].items()}
