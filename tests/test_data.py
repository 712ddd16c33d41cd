"""Data: every format reads to the same examples; every bad row names its file and line."""

from __future__ import annotations

import bz2
import gzip
import json
import lzma
from pathlib import Path

import pytest
from conftest import toy_examples, write_tsv

from toolkit.config import DataConfig
from toolkit.data import DataError, prepare_data, read_all
from toolkit.recipe import parse_recipe


def data_config(tmp_path: Path, **data) -> DataConfig:
    raw = {"name": "t", "data": data, "model": {"name": "org/model"}, "stages": [{"type": "train"}]}
    return parse_recipe(raw, tmp_path).data


ROWS = toy_examples(40)


def write_csv(path: Path, rows, newline="\n", bom=False) -> Path:
    lines = ["text,label"] + [f'"{t}",{label}' for t, label in rows]
    path.write_bytes((("\ufeff" if bom else "") + newline.join(lines) + newline).encode("utf-8"))
    return path


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("\n".join(json.dumps({"text": t, "label": label}) for t, label in rows) + "\n")
    return path


def test_formats_read_the_same_examples(tmp_path):
    configs = {
        "tsv": data_config(tmp_path, train=str(write_tsv(tmp_path / "a.tsv", ROWS))),
        "csv": data_config(tmp_path, train=str(write_csv(tmp_path / "a.csv", ROWS)), text_column="text"),
        "jsonl": data_config(tmp_path, train=str(write_jsonl(tmp_path / "a.jsonl", ROWS)), text_column="text"),
    }
    results = {fmt: read_all(cfg) for fmt, cfg in configs.items()}
    assert {cfg.format for cfg in configs.values()} == {"tsv", "csv", "jsonl"}
    first = results["tsv"]
    for fmt, result in results.items():
        assert result == first, fmt
    texts, labels, names = first
    assert names == ["negative", "positive"]
    assert sum(len(v) for v in texts.values()) == 40
    assert set(texts) == {"train", "validation", "test"}


def test_datasets_folder_with_classlabel_names(tmp_path):
    from datasets import ClassLabel, Dataset, DatasetDict, Features, Value

    features = Features({"sentence": Value("string"), "label": ClassLabel(names=["neg", "pos"])})
    split = {"sentence": [t for t, _ in ROWS], "label": [int(lab == "positive") for _, lab in ROWS]}
    DatasetDict({"train": Dataset.from_dict(split, features=features)}).save_to_disk(str(tmp_path / "ds"))
    cfg = data_config(tmp_path, path="ds", format="disk")
    texts, labels, names = read_all(cfg)
    assert names == ["neg", "pos"]
    assert sum(len(v) for v in texts.values()) == 40


def test_integer_labels_with_declared_names_travel_with_the_data(tmp_path):
    path = write_tsv(tmp_path / "int.tsv", ROWS, labels={"negative": 0, "positive": 1})
    cfg = data_config(tmp_path, train=str(path), labels=["bad", "good"])
    texts, labels, names = read_all(cfg)
    assert names == ["bad", "good"]
    assert all(
        ("good" in t or "great" in t or "superb" in t or "lovely" in t or "brilliant" in t) == bool(y)
        for t, y in zip(texts["train"], labels["train"], strict=True)
    )
    plain = data_config(tmp_path, train=str(path))
    assert read_all(plain)[2] == ["0", "1"]


def test_chinese_crlf_and_bom(tmp_path):
    rows = [("这部电影很好看", "1"), ("质量太差了，不推荐", "0")] * 10
    path = tmp_path / "zh.tsv"
    body = "index\tsentence\tlabel\r\n" + "".join(f"{i}\t{t}\t{y}\r\n" for i, (t, y) in enumerate(rows))
    path.write_bytes(("\ufeff" + body).encode("utf-8"))
    texts, labels, names = read_all(data_config(tmp_path, train=str(path)))
    all_texts = [t for split in texts.values() for t in split]
    assert set(all_texts) == {"这部电影很好看", "质量太差了，不推荐"}  # no stray \r, no BOM in the header
    assert names == ["0", "1"]
    csv_path = write_csv(tmp_path / "zh.csv", rows, newline="\r\n", bom=True)
    texts, _, _ = read_all(data_config(tmp_path, train=str(csv_path), text_column="text"))
    assert "这部电影很好看" in [t for split in texts.values() for t in split]


def test_compressed_csv(tmp_path):
    path = write_csv(tmp_path / "a.csv", ROWS)
    packed = tmp_path / "a.csv.bz2"
    packed.write_bytes(bz2.compress(path.read_bytes()))
    cfg = data_config(tmp_path, train=str(packed), text_column="text")
    assert cfg.format == "csv"
    assert sum(len(v) for v in read_all(cfg)[0].values()) == 40


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("index\tsentence\tlabel\n0\tgood film\t1\n1\tbad film\n", r"bad\.tsv:3: expected 3 tab-separated fields"),
        ("index\ttext\tlabel\n0\tgood film\t1\n", r"bad\.tsv:1: no column 'sentence' in the header .*text_column"),
        ("index\tsentence\tlabel\n0\tgood\t1\n1\t  \t0\n", r"bad\.tsv:3: empty text in column 'sentence'"),
        ("index\tsentence\tlabel\n0\tgood\t1\n1\tfine\t\n", r"bad\.tsv:3: empty label"),
    ],
)
def test_bad_tsv_rows_name_file_and_line(tmp_path, content, message):
    path = tmp_path / "bad.tsv"
    path.write_text(content)
    with pytest.raises(DataError, match=message):
        read_all(data_config(tmp_path, train=str(path)))


def test_undecodable_bytes_name_the_line(tmp_path):
    path = tmp_path / "bad.tsv"
    path.write_bytes(b"index\tsentence\tlabel\n0\tgood\t1\n1\tcaf\xe9 au lait\t0\n")
    with pytest.raises(DataError, match=r"bad\.tsv:3: bytes that are not UTF-8 .*re-save the file as UTF-8"):
        read_all(data_config(tmp_path, train=str(path)))


def test_label_outside_known_set(tmp_path):
    train = write_tsv(tmp_path / "train.tsv", ROWS)
    test = write_tsv(tmp_path / "test.tsv", [("a neutral film", "neutral")])
    with pytest.raises(DataError, match=r"test\.tsv:2: label 'neutral' is not one of the known labels"):
        read_all(data_config(tmp_path, train=str(train), test=str(test)))
    with pytest.raises(DataError, match=r"train\.tsv:2: label 'positive' is not one of the known labels \['a', 'b'\]"):
        read_all(data_config(tmp_path, train=str(train), labels=["a", "b"]))


def test_bad_csv_and_jsonl_rows(tmp_path):
    csv_path = tmp_path / "bad.csv"
    csv_path.write_text('text,label\n"fine film",positive\n"multi\nline text",negative\n"short",negative,extra\n')
    with pytest.raises(DataError, match=r"bad\.csv:5: expected 2 comma-separated fields"):
        read_all(data_config(tmp_path, train=str(csv_path), text_column="text"))
    jsonl = tmp_path / "bad.jsonl"
    jsonl.write_text('{"text": "good", "label": "positive"}\n{"text": "bad"\n')
    with pytest.raises(DataError, match=r"bad\.jsonl:2: invalid JSON"):
        read_all(data_config(tmp_path, train=str(jsonl), text_column="text"))
    jsonl.write_text('{"text": "good", "label": "positive"}\n{"txt": "bad", "label": "negative"}\n')
    with pytest.raises(DataError, match=r"bad\.jsonl:2: no key 'text'"):
        read_all(data_config(tmp_path, train=str(jsonl), text_column="text"))


def test_stratified_split_is_seeded_and_balanced(tmp_path):
    path = write_tsv(tmp_path / "a.tsv", toy_examples(200))
    cfg = data_config(tmp_path, train=str(path), split={"validation": 0.1, "test": 0.2, "seed": 7})
    texts, labels, _ = read_all(cfg)
    assert {k: len(v) for k, v in texts.items()} == {"train": 140, "validation": 20, "test": 40}
    assert sum(labels["test"]) == 20  # half of each class, like the source
    assert read_all(cfg) == (texts, labels, ["negative", "positive"])
    assert not set(texts["test"]) & set(texts["train"])


def test_drop_labels_dedupe_and_limits(tmp_path):
    rows = ROWS + [(ROWS[0][0], ROWS[0][1]), (ROWS[1][0], "positive"), ("a plot summary", "plot")]
    path = write_tsv(tmp_path / "a.tsv", rows)
    cfg = data_config(tmp_path, train=str(path), drop_labels=["plot"], dedupe=True, max_samples={"test": 3})
    texts, labels, names = read_all(cfg)
    everything = [t for split in texts.values() for t in split]
    assert names == ["negative", "positive"]
    assert ROWS[0][0] in everything and everything.count(ROWS[0][0]) == 1
    assert ROWS[1][0] not in everything  # the same text with two labels is dropped, not guessed
    assert len(texts["test"]) == 3


def test_prepared_data_is_saved_once_and_tokenised_with_dynamic_lengths(tmp_path, tiny_model):
    from transformers import AutoTokenizer

    rows = [(text + " and more words" * (i % 3), label) for i, (text, label) in enumerate(ROWS)]
    cfg = data_config(tmp_path, train=str(write_tsv(tmp_path / "a.tsv", rows)))
    prepared = prepare_data(cfg, tmp_path / "run")
    stamp = (tmp_path / "run" / "data" / "meta.json").stat().st_mtime_ns
    again = prepare_data(cfg, tmp_path / "run")
    assert (tmp_path / "run" / "data" / "meta.json").stat().st_mtime_ns == stamp
    assert again.fingerprint == prepared.fingerprint
    tokenized = prepared.tokenized(AutoTokenizer.from_pretrained(tiny_model), 64)
    lengths = {len(ids) for ids in tokenized["train"]["input_ids"]}
    assert len(lengths) > 1  # not padded to a fixed length: batches are padded when collated
    assert "labels" in tokenized["train"].column_names


def test_boolean_json_labels(tmp_path):
    path = tmp_path / "b.jsonl"
    path.write_text("\n".join(json.dumps({"text": t, "label": y == "positive"}) for t, y in ROWS) + "\n")
    texts, labels, names = read_all(data_config(tmp_path, train=str(path), text_column="text"))
    assert names == ["False", "True"]
    assert sum(len(v) for v in labels.values()) == 40


def test_split_fractions_must_leave_training_data(tmp_path):
    from toolkit.recipe import RecipeError

    with pytest.raises(RecipeError, match=r"data.split: validation \+ test = 0.9 leaves too little"):
        data_config(tmp_path, train=str(write_tsv(tmp_path / "a.tsv", ROWS)), split={"validation": 0.4, "test": 0.5})


CHINESE = [("这部电影很好看", "positive"), ("质量太差了", "negative")] * 6


@pytest.mark.parametrize("encoding", ["gbk", "gb18030", "latin-1"])
def test_data_encoding_reads_other_encodings(tmp_path, encoding):
    rows = (
        CHINESE if encoding.startswith("gb") else [("café au lait, très bon", "positive"), ("mauvais", "negative")] * 6
    )
    body = "index\tsentence\tlabel\n" + "".join(f"{i}\t{t}\t{label}\n" for i, (t, label) in enumerate(rows))
    path = tmp_path / "train.tsv"
    path.write_bytes(body.encode(encoding))
    with pytest.raises(DataError, match=r"train\.tsv:2: bytes that are not UTF-8 .*set data\.encoding"):
        read_all(data_config(tmp_path, train=str(path)))
    texts, _, names = read_all(data_config(tmp_path, train=str(path), encoding=encoding))
    assert rows[0][0] in texts["train"] + texts["test"] + texts["validation"] and names == ["negative", "positive"]


@pytest.mark.parametrize("codec", ["utf-16", "utf-32", "utf-8-sig"])
def test_byte_order_mark_decides_the_encoding(tmp_path, codec):
    body = "index\tsentence\tlabel\n" + "".join(f"{i}\t{t}\t{label}\n" for i, (t, label) in enumerate(CHINESE))
    path = tmp_path / "train.tsv"
    path.write_bytes(body.encode(codec))  # Python's utf-16/utf-32 codecs write a BOM
    texts, _, _ = read_all(data_config(tmp_path, train=str(path)))
    assert sum(len(t) for t in texts.values()) == len(CHINESE)


def test_nul_byte_and_broken_compressed_files_name_the_file(tmp_path):
    nul = tmp_path / "nul.tsv"
    nul.write_bytes("index\tsentence\tlabel\n0\tgood\t1\n".encode("utf-16-le"))  # UTF-16 without a BOM
    with pytest.raises(DataError, match=r"nul\.tsv:1: a NUL byte, so this is not UTF-8 text"):
        read_all(data_config(tmp_path, train=str(nul)))
    good = ("index\tsentence\tlabel\n" + "0\tgood film\t1\n" * 200).encode()
    for suffix, compress in ((".gz", gzip.compress), (".bz2", bz2.compress), (".xz", lzma.compress)):
        path = tmp_path / f"train.tsv{suffix}"
        path.write_bytes(compress(good)[:-20])  # cut short, as an interrupted download
        with pytest.raises(DataError, match=rf"train\.tsv\{suffix}: the \w+ file is truncated or corrupt"):
            read_all(data_config(tmp_path, train=str(path)))


def test_unknown_encoding_is_a_recipe_error(tmp_path):
    from toolkit.recipe import RecipeError

    path = write_tsv(tmp_path / "train.tsv", ROWS)
    with pytest.raises(RecipeError, match=r"data\.encoding: Value error, unknown encoding 'klingon'|unknown encoding"):
        data_config(tmp_path, train=str(path), encoding="klingon")


def test_dedupe_across_splits_and_conflicting_labels(tmp_path):
    train = tmp_path / "train.tsv"
    train.write_text(
        "sentence\tlabel\ngood\tpositive\n good \tpositive\nmixed\tpositive\nbad\tnegative\nfine\tpositive\n"
    )
    test = tmp_path / "test.tsv"
    test.write_text("sentence\tlabel\ngood\tpositive\nmixed\tnegative\nawful\tnegative\n")
    validation = tmp_path / "validation.tsv"
    validation.write_text("sentence\tlabel\nawful\tnegative\nok\tpositive\n")
    cfg = data_config(tmp_path, train=str(train), test=str(test), validation=str(validation), dedupe=True)
    texts, labels, names = read_all(cfg)
    # the first copy wins (earlier splits first: no test text in train); a text with two labels goes everywhere
    assert texts == {"train": ["good", "bad", "fine"], "validation": ["awful", "ok"], "test": []}
    assert [names[i] for i in labels["train"]] == ["positive", "negative", "positive"]


def test_unchanged_files_are_not_read_again_for_the_fingerprint(tmp_path, monkeypatch):
    import os

    import toolkit.data as data

    path = write_tsv(tmp_path / "train.tsv", ROWS)
    cfg = data_config(tmp_path, train=str(path))
    first = prepare_data(cfg, tmp_path / "run")
    opened = []
    real_open = Path.open
    monkeypatch.setattr(Path, "open", lambda self, *a, **k: opened.append(self) or real_open(self, *a, **k))
    assert prepare_data(cfg, tmp_path / "run").fingerprint == first.fingerprint
    assert path not in opened  # size, mtime and inode unchanged: the recorded digest is reused
    os.utime(path, ns=(1, 1))  # touched, same bytes: read again, same fingerprint, data kept
    assert data.prepare_data(cfg, tmp_path / "run").fingerprint == first.fingerprint
    assert path in opened
    path.write_text(path.read_text().replace("positive", "negative", 1))
    assert prepare_data(cfg, tmp_path / "run").fingerprint != first.fingerprint


# Runs in its own process: samples the anonymous resident memory (what the process holds, not the pages of the
# memory-mapped Arrow files, which the kernel can drop) while the data is prepared.
MEMORY_PROBE = """
import json, pathlib, sys, threading, time
import datasets, pyarrow  # imported before the baseline: it measures the data, not the libraries
from toolkit.data import prepare_data
from toolkit.recipe import parse_recipe

def anon_kib():
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("RssAnon"))

folder = pathlib.Path(sys.argv[1])
raw = {"name": "t", "data": {"train": sys.argv[2]}, "model": {"name": "org/m"}, "stages": [{"type": "train"}]}
cfg = parse_recipe(raw, folder).data
base, peak, done = anon_kib(), [0], threading.Event()
def sample():
    while not done.is_set():
        peak[0] = max(peak[0], anon_kib())
        time.sleep(0.005)
threading.Thread(target=sample, daemon=True).start()
prepared = prepare_data(cfg, folder / "run")
done.set()
counts = {s: prepared.count(s) for s in ("train", "validation", "test")}
print(json.dumps({"base_kib": base, "peak_kib": max(peak[0], anon_kib()), "counts": counts}))
"""


@pytest.mark.slow
def test_a_corpus_of_millions_of_rows_streams_in_bounded_memory(tmp_path):
    """Memory grows by tens of bytes per row whatever the texts' length, less than the file: rows stream into
    Arrow files (memory-mapped), not into Python lists (which took several times the file)."""
    import subprocess
    import sys

    rows = 3_000_000
    path = tmp_path / "big.tsv"
    with path.open("w") as out:
        out.write("sentence\tlabel\n")
        for i in range(rows):
            verdict = "great fun" if i % 3 else "a long bore"
            out.write(f"review {i}: the plot of this film was {verdict} to sit through\t{'pos' if i % 3 else 'neg'}\n")
    done = subprocess.run(
        [sys.executable, "-c", MEMORY_PROBE, str(tmp_path), str(path)], capture_output=True, text=True, check=True
    )
    figures = json.loads(done.stdout.strip().splitlines()[-1])
    grown = (figures["peak_kib"] - figures["base_kib"]) * 1024
    size = path.stat().st_size
    print(f"file {size / 2**20:.0f} MiB, {rows:,} rows: peak anonymous memory +{grown / 2**20:.0f} MiB", end=" ")
    print(f"({grown / rows:.0f} B/row, {grown / size:.2f}x the file)")
    assert sum(figures["counts"].values()) == rows
    assert grown < 64 * rows
    assert grown < size
