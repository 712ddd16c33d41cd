"""Labelled text data: read, check row by row, split, and keep as a `datasets` folder in the run.

Files are parsed here rather than by `datasets`' CSV loader so that every bad row is reported with its file
and line. Rows stream from the file (decompressed and decoded a chunk at a time) into Arrow files, so memory holds
8 bytes per row (the label id, for stratified splits; 16 with dedupe, which adds a text hash), not the texts. The checked result is
saved once per run folder (fingerprinted by the data options and the input files' bytes; unchanged files are not
re-read), and tokenisation is a cached `datasets.map` on that memory-mapped copy.
"""

from __future__ import annotations

import bz2
import codecs
import csv
import gzip
import hashlib
import itertools
import json
import lzma
import shutil
import tempfile
import zlib
from array import array
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from toolkit.errors import ToolkitError
from toolkit.sources import file_sha256

if TYPE_CHECKING:
    from datasets import DatasetDict

    from toolkit.config import DataConfig

SPLITS = ("train", "validation", "test")


class DataError(ToolkitError, ValueError):
    """Bad input data; the message names the file and line (or split and row) and what to fix."""


@dataclass
class Row:
    where: str  # "file:line" or "dataset[split] row N", for error messages
    text: str
    label: Any


# ---------------------------------------------------------------------------------------------- reading


BOMS = (
    (codecs.BOM_UTF32_LE, "utf-32"),  # before UTF-16 LE, whose BOM is its prefix
    (codecs.BOM_UTF32_BE, "utf-32"),
    (codecs.BOM_UTF8, "utf-8-sig"),
    (codecs.BOM_UTF16_LE, "utf-16"),
    (codecs.BOM_UTF16_BE, "utf-16"),
)
OPENERS = {".bz2": ("bzip2", bz2.open), ".gz": ("gzip", gzip.open), ".xz": ("xz", lzma.open)}
COMPRESSED = tuple(OPENERS)
CHUNK_BYTES = 1 << 20
WRITE_BATCH = 10_000  # rows per Arrow record batch


def _chunks(path: Path) -> Iterator[bytes]:
    """The file's bytes, decompressed by suffix, a chunk at a time (a file larger than memory streams)."""
    kind, opener = OPENERS.get(path.suffix, (None, open))
    try:
        with opener(path, "rb") as stream:
            while chunk := stream.read(CHUNK_BYTES):
                yield chunk
    except (EOFError, OSError, lzma.LZMAError, zlib.error, ValueError) as exc:
        if kind is None:
            raise
        raise DataError(
            f"{path}: the {kind} file is truncated or corrupt ({type(exc).__name__}: {exc}); re-create or re-download it"
        ) from None


def _text_lines(path: Path, encoding: str = "utf-8", keepends: bool = False) -> Iterator[tuple[int, str]]:
    """(line number, line) of the file's text, streamed: a BOM wins over `encoding`, every undecodable byte and
    every NUL byte (a binary or UTF-16 file read as 8-bit text) is an error naming the line. Lines split on \\n only:
    str.splitlines would also break on characters that can sit inside a review."""
    chunks = _chunks(path)
    first = next(chunks, b"")
    utf8 = codecs.lookup(encoding).name == "utf-8"
    shown = "UTF-8" if utf8 else encoding
    bom = next((name for mark, name in BOMS if first.startswith(mark)), None)
    codec = bom or ("utf-8-sig" if utf8 else encoding)
    wide = codecs.lookup(codec).name.startswith(("utf-16", "utf-32"))
    decoder = codecs.getincrementaldecoder(codec)()
    number, carry = 1, ""
    for chunk in itertools.chain([first], chunks):
        if not wide and b"\x00" in chunk:
            line = number + chunk[: chunk.index(b"\x00")].count(b"\n")
            raise DataError(
                f"{path}:{line}: a NUL byte, so this is not {shown} text (a binary file, or UTF-16 without a BOM?); "
                "save it as UTF-8 or set data.encoding"
            )
        try:
            text = carry + decoder.decode(chunk)
        except UnicodeDecodeError as exc:
            line = number + chunk[: max(0, exc.start)].count(b"\n")
            raise DataError(
                f"{path}:{line}: bytes that are not {shown} ({exc.object[exc.start : exc.start + 4]!r}); re-save the "
                "file as UTF-8, or set data.encoding to its encoding (e.g. gbk, gb18030, latin-1, utf-16)"
            ) from None
        *complete, carry = text.split("\n")
        for line in complete:
            yield number, line + "\n" if keepends else line.removesuffix("\r")
            number += 1
    try:
        carry += decoder.decode(b"", final=True)
    except UnicodeDecodeError:
        raise DataError(f"{path}:{number}: the file ends inside a {shown} character; re-save it") from None
    yield number, carry if keepends else carry.removesuffix("\r")


def _column_index(path: Path, header: list[str], column: str, key: str, owner: str = "data") -> int:
    """`owner`: the recipe key whose `key` option names the column, for the error message."""
    if column not in header:
        raise DataError(
            f"{path}:1: no column {column!r} in the header (columns: {', '.join(header)}); set {owner}.{key}"
        )
    return header.index(column)


def _label_index(path: Path, header: list[str], column: str, optional: bool) -> int | None:
    """The label column's index; with `optional` (scoring a file), None when the file has no such column."""
    if optional and column not in header:
        return None
    return _column_index(path, header, column, "label_column")


def _pick(fields: list[str], index: int | None) -> str | None:
    return None if index is None else fields[index]


def read_tsv(
    path: Path,
    text_column: str,
    label_column: str,
    encoding: str = "utf-8",
    label_optional: bool = False,
    owner: str = "data",
) -> Iterator[Row]:
    lines = _text_lines(path, encoding)
    _, first = next(lines, (1, ""))
    header = first.split("\t")
    t = _column_index(path, header, text_column, "text_column", owner)
    lab = _label_index(path, header, label_column, label_optional)
    for number, line in lines:
        if not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) != len(header):
            raise DataError(
                f"{path}:{number}: expected {len(header)} tab-separated fields ({', '.join(header)}), "
                f"found {len(fields)}"
            )
        yield Row(f"{path}:{number}", fields[t], _pick(fields, lab))


def read_csv(
    path: Path,
    text_column: str,
    label_column: str,
    encoding: str = "utf-8",
    label_optional: bool = False,
    owner: str = "data",
) -> Iterator[Row]:
    reader = csv.reader(line for _, line in _text_lines(path, encoding, keepends=True))
    header = next(reader, [])
    t = _column_index(path, header, text_column, "text_column", owner)
    lab = _label_index(path, header, label_column, label_optional)
    start = reader.line_num + 1
    try:
        for fields in reader:
            number, start = start, reader.line_num + 1
            if not fields or not any(f.strip() for f in fields):
                continue
            if len(fields) != len(header):
                raise DataError(
                    f"{path}:{number}: expected {len(header)} comma-separated fields ({', '.join(header)}), "
                    f"found {len(fields)}"
                )
            yield Row(f"{path}:{number}", fields[t], _pick(fields, lab))
    except csv.Error as exc:
        raise DataError(f"{path}:{reader.line_num}: malformed CSV ({exc})") from None


def read_jsonl(
    path: Path,
    text_column: str,
    label_column: str,
    encoding: str = "utf-8",
    label_optional: bool = False,
    owner: str = "data",
) -> Iterator[Row]:
    for number, line in _text_lines(path, encoding):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}:{number}: invalid JSON ({exc.msg} at column {exc.colno})") from None
        if not isinstance(record, dict):
            raise DataError(f"{path}:{number}: expected a JSON object per line, got {type(record).__name__}")
        for column, key in ((text_column, "text_column"), (label_column, "label_column")):
            if column not in record and not (label_optional and key == "label_column"):
                where = owner if key == "text_column" else "data"
                raise DataError(f"{path}:{number}: no key {column!r} (keys: {', '.join(record)}); set {where}.{key}")
        yield Row(f"{path}:{number}", record[text_column], record.get(label_column))


READERS = {"tsv": read_tsv, "csv": read_csv, "jsonl": read_jsonl}


def read_texts(path: Path, fmt: str, text_column: str, owner: str) -> Iterator[Row]:
    """Texts without labels: `text` is one text per line (blank lines skipped); tsv/csv/jsonl read `text_column`
    and ignore any other column. `owner` is the recipe key that names the file, for error messages."""
    if fmt == "text":
        for number, line in _text_lines(path):
            if line.strip():
                yield Row(f"{path}:{number}", line, None)
        return
    yield from READERS[fmt](path, text_column, "", label_optional=True, owner=owner)


def dataset_split(cfg: DataConfig, split: str) -> tuple[Iterator[Row], list[str] | None]:
    """The rows of a split of a `datasets` folder or Hub dataset (streamed in batches from its Arrow files), plus
    its ClassLabel names when it has them."""
    import datasets

    if cfg.format == "disk":
        loaded = datasets.load_from_disk(cfg.path)
        if split not in loaded:
            raise DataError(f"{cfg.path}: no split {split!r} (splits: {', '.join(loaded)})")
        ds = loaded[split]
    else:
        try:
            ds = datasets.load_dataset(cfg.path, cfg.subset, split=split)
        except Exception as exc:  # the Hub raises many types; the user needs the id and the reason
            raise DataError(f"Hub dataset {cfg.path!r} split {split!r} could not be loaded: {exc}") from exc
    for column, key in ((cfg.text_column, "text_column"), (cfg.label_column, "label_column")):
        if column not in ds.column_names:
            raise DataError(
                f"{cfg.path}[{split}]: no column {column!r} (columns: {', '.join(ds.column_names)}); set data.{key}"
            )
    feature = ds.features[cfg.label_column]
    names = list(feature.names) if hasattr(feature, "names") else None

    def rows() -> Iterator[Row]:
        columns = ds.select_columns([cfg.text_column, cfg.label_column])
        for start, batch in zip(itertools.count(0, 1000), columns.iter(batch_size=1000), strict=False):
            pairs = zip(batch[cfg.text_column], batch[cfg.label_column], strict=True)
            for i, (text, label) in enumerate(pairs, start=start):
                yield Row(f"{cfg.path}[{split}] row {i}", text, label)

    return rows(), names


# ---------------------------------------------------------------------------------------------- checking


def check_text(row: Row, column: str) -> str:
    if not isinstance(row.text, str):
        raise DataError(f"{row.where}: text in {column!r} must be a string, got {type(row.text).__name__}")
    if not row.text.strip():
        raise DataError(f"{row.where}: empty text in column {column!r}")
    return row.text


def _as_int(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        return int(value.strip())
    return None


class LabelMap:
    """Turns raw labels (names or integers) into ids; `names` travel with the model as id2label."""

    def __init__(self, names: list[str], by_int: bool):
        self.names = names
        self.by_int = by_int  # integer labels are ids into `names`
        self._ids = {name: i for i, name in enumerate(names)}

    @classmethod
    def infer(cls, declared: list[str] | None, raw: list[Any], feature_names: list[str] | None) -> LabelMap:
        """The label names: declared, else the dataset's ClassLabel names, else from the training split's raw
        labels (`raw`: each distinct value once)."""
        if declared is not None:
            return cls(list(declared), by_int=True)
        if feature_names is not None:
            return cls(feature_names, by_int=True)
        ints = [_as_int(v) for v in raw]
        if all(i is not None for i in ints):
            # Integer labels keep their values as names, so 0/1 stay "0"/"1" and ids follow sorted order.
            return cls([str(v) for v in sorted(set(ints))], by_int=False)
        return cls(sorted({str(v).strip() for v in raw}), by_int=False)

    def id_of(self, row: Row, column: str) -> int:
        value = row.label
        if isinstance(value, str):
            value = value.strip()
            if value == "":
                raise DataError(f"{row.where}: empty label in column {column!r}")
        if str(value) in self._ids:  # JSON booleans and floats are named by their text, like the training split's
            return self._ids[str(value)]
        number = _as_int(value)
        if number is not None:
            if self.by_int and 0 <= number < len(self.names):
                return number
            if not self.by_int and str(number) in self._ids:
                return self._ids[str(number)]
        raise DataError(
            f"{row.where}: label {row.label!r} is not one of the known labels {self.names} "
            "(known labels come from data.labels, or from the training split)"
        )


def stratified_split(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices (rest, carved), each sorted: `fraction` of each class carved out, with a fixed seed."""
    rng = np.random.default_rng(seed)
    carved = np.zeros(len(labels), dtype=bool)
    for label in np.unique(labels):
        idx = np.flatnonzero(labels == label)
        rng.shuffle(idx)
        carved[idx[: max(1, round(len(idx) * fraction))]] = True
    return np.flatnonzero(~carved), np.flatnonzero(carved)


def _source_rows(cfg: DataConfig, split: str) -> tuple[Iterator[Row], list[str] | None]:
    """A split's rows, streamed, without the rows whose label `drop_labels` names; the texts checked."""
    source = getattr(cfg, split)
    if cfg.format in READERS:
        rows, names = READERS[cfg.format](Path(source), cfg.text_column, cfg.label_column, cfg.encoding), None
    else:
        rows, names = dataset_split(cfg, source)
    drop = {str(label) for label in cfg.drop_labels}

    def kept() -> Iterator[Row]:
        for row in rows:
            if str(row.label).strip() not in drop:
                check_text(row, cfg.text_column)
                yield row

    return kept(), names


def _label_map(cfg: DataConfig) -> LabelMap:
    """Declared names, else the dataset's ClassLabel names, else the training split's labels (one streamed pass)."""
    rows, feature_names = _source_rows(cfg, "train")
    if cfg.labels is not None or feature_names is not None:
        return LabelMap.infer(cfg.labels, [], feature_names)
    distinct: dict[tuple[str, str], Any] = {}
    for row in rows:
        distinct.setdefault((type(row.label).__name__, str(row.label)), row.label)
    return LabelMap.infer(None, list(distinct.values()), None)


@dataclass
class _Written:
    """A split streamed into an Arrow file: its label ids and a 64-bit hash of each stripped text (for dedupe),
    8 bytes each per row in memory whatever the texts' length."""

    path: Path
    labels: np.ndarray
    keys: np.ndarray


def _text_key(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.strip().encode(), digest_size=8).digest(), "little")


def _write_split(rows: Iterator[Row], label_map: LabelMap, cfg: DataConfig, path: Path, features) -> _Written:
    import pyarrow as pa

    labels, keys = array("q"), array("Q")
    schema = features.arrow_schema
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, schema) as writer:
        while batch := list(itertools.islice(rows, WRITE_BATCH)):
            ids = [label_map.id_of(row, cfg.label_column) for row in batch]
            texts = [row.text for row in batch]
            columns = [pa.array(texts, pa.string()), pa.array(ids, pa.int64())]
            writer.write_batch(pa.record_batch(columns, schema=schema))
            labels.extend(ids)
            if cfg.dedupe:
                keys.extend(_text_key(text) for text in texts)
    return _Written(path, np.frombuffer(labels, dtype=np.int64), np.frombuffer(keys, dtype=np.uint64))


def _dedupe(written: dict[str, _Written]) -> dict[str, np.ndarray]:
    """Row indices to keep per split: the first copy of each text (earlier splits win, so a test text that also sits
    in train leaves test: no leakage); every copy of a text that carries two different labels goes."""
    order = [s for s in SPLITS if s in written]
    keys = np.concatenate([written[s].keys for s in order])
    labels = np.concatenate([written[s].labels for s in order])
    unique, first, inverse = np.unique(keys, return_index=True, return_inverse=True)
    lowest = np.full(len(unique), np.iinfo(np.int64).max)
    highest = np.full(len(unique), np.iinfo(np.int64).min)
    np.minimum.at(lowest, inverse, labels)
    np.maximum.at(highest, inverse, labels)
    keep = np.zeros(len(keys), dtype=bool)
    keep[first[lowest == highest]] = True
    bounds = np.cumsum([0] + [len(written[s].keys) for s in order])
    return {s: np.flatnonzero(keep[bounds[i] : bounds[i + 1]]) for i, s in enumerate(order)}


def _build(cfg: DataConfig, work: Path) -> tuple[dict[str, Any], list[str]]:
    """Every split as a memory-mapped `datasets.Dataset` (text, label id), checked row by row while it streams into
    Arrow, then deduplicated, carved and subsampled by index; plus the label names."""
    from datasets import ClassLabel, Dataset, Features, Value

    label_map = _label_map(cfg)
    features = Features({"text": Value("string"), "label": ClassLabel(names=label_map.names)})
    written = {}
    for split in SPLITS:
        if getattr(cfg, split) is not None:
            rows, _ = _source_rows(cfg, split)
            written[split] = _write_split(rows, label_map, cfg, work / f"{split}.arrow", features)
    source = {s: written[s].path for s in written}
    rows_in = {w.path: len(w.labels) for w in written.values()}
    if cfg.dedupe:
        keep = _dedupe(written)
        labels = {s: written[s].labels[keep[s]] for s in written}
    else:
        keep = {s: np.arange(len(w.labels)) for s, w in written.items()}
        labels = {s: w.labels for s, w in written.items()}
    del written
    if not len(keep["train"]):
        raise DataError(f"{cfg.train}: no training examples left (after drop_labels/dedupe)")
    _carve_missing_splits(keep, labels, source, cfg)
    _subsample(keep, labels, cfg)
    if len(np.unique(labels["train"])) < 2:
        raise DataError(f"{cfg.train}: the training split has a single class; a classifier needs two or more")
    del labels
    # A split that keeps every row of its file (given, not deduplicated or carved) is used as written.
    files = {s: source[s] if len(keep[s]) == rows_in[source[s]] else _take(source[s], keep[s], work / f"{s}.final.arrow")
             for s in SPLITS}  # fmt: skip
    datasets = {s: Dataset.from_file(str(files[s])) for s in SPLITS}
    return datasets, label_map.names


def _take(source: Path, indices: np.ndarray, dest: Path) -> Path:
    """The rows `indices` (sorted) of an Arrow stream file, copied a record batch at a time into `dest`.
    (datasets' `select` builds its index mapping in memory, and Arrow's `take` on a whole table joins its chunks.)"""
    import pyarrow as pa

    with (
        pa.memory_map(str(source)) as mapped,
        pa.ipc.open_stream(mapped) as reader,
        pa.OSFile(str(dest), "wb") as sink,
        pa.ipc.new_stream(sink, reader.schema) as writer,
    ):
        offset = 0
        for batch in reader:
            lo, hi = np.searchsorted(indices, [offset, offset + batch.num_rows])
            if hi > lo:
                writer.write_batch(batch.take(pa.array(indices[lo:hi] - offset)))
            offset += batch.num_rows
    return dest


def _carve_missing_splits(keep: dict, labels: dict, source: dict, cfg: DataConfig) -> None:
    # Fractions are of the whole pool: once test is carved, validation's share of what is left is larger.
    test_carved = "test" not in keep
    for split in ("test", "validation"):
        if split in keep:
            continue
        fraction = getattr(cfg.split, split)
        if split == "validation" and test_carved:
            fraction = fraction / (1 - cfg.split.test)
        rest, carved = stratified_split(labels["train"], fraction, cfg.split.seed)
        source[split] = source["train"]
        for store in (keep, labels):
            store[split], store["train"] = store["train"][carved], store["train"][rest]


def _subsample(keep: dict, labels: dict, cfg: DataConfig) -> None:
    for split, limit in cfg.max_samples.items():
        if len(keep[split]) <= limit:
            continue
        _, chosen = stratified_split(labels[split], limit / len(keep[split]), cfg.split.seed)
        chosen = chosen[:limit]
        keep[split], labels[split] = keep[split][chosen], labels[split][chosen]


def read_all(cfg: DataConfig) -> tuple[dict[str, list[str]], dict[str, list[int]], list[str]]:
    """Every split's texts and label ids as lists, checked row by row, plus the label names (for small data and
    tests; a run keeps them on disk: `prepare_data`)."""
    with tempfile.TemporaryDirectory() as work:
        splits, names = _build(cfg, Path(work))
        texts = {s: list(ds["text"]) for s, ds in splits.items()}
        labels = {s: list(ds["label"]) for s, ds in splits.items()}
        del splits
    return texts, labels, names


# ---------------------------------------------------------------------------------------------- the run's copy


def _file_digest(path: Path, known: dict) -> dict:
    """The file's sha256, streamed; reused from `known` (an earlier run's record) while its size, modification
    time and inode are unchanged, so an unchanged corpus is not read again to learn that it is unchanged."""
    stat = path.stat()
    record = {"path": str(path.resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "inode": stat.st_ino}
    previous = known.get(record["path"], {})
    if "sha256" in previous and all(previous.get(k) == v for k, v in record.items()):
        return previous
    return {**record, "sha256": file_sha256(path, CHUNK_BYTES)}


def data_fingerprint(cfg: DataConfig, known: dict | None = None) -> tuple[str, dict]:
    """A digest of the data options and the input files' bytes, and the per-file records that let the next call
    skip re-reading unchanged files."""
    # The default encoding is left out so that runs made before `encoding` existed keep their data.
    digest = hashlib.sha256(cfg.model_dump_json(exclude={"encoding"} if cfg.encoding == "utf-8" else None).encode())
    files = {}
    if cfg.format in READERS:
        for split in SPLITS:
            source = getattr(cfg, split)
            if source is not None:
                record = _file_digest(Path(source), known or {})
                files[record["path"]] = record
                digest.update(bytes.fromhex(record["sha256"]))
    elif cfg.format == "disk":
        for state in sorted(Path(cfg.path).rglob("state.json")):
            digest.update(state.read_bytes())
    return digest.hexdigest()[:16], files


@dataclass
class PreparedData:
    path: Path
    label_names: list[str]
    fingerprint: str

    def load(self) -> DatasetDict:
        import datasets

        return datasets.load_from_disk(str(self.path / "dataset"))

    def texts(self, split: str, limit: int | None = None) -> list[str]:
        """A split's texts (the first `limit`), as a list: for evaluation-sized splits and samples."""
        ds = self.load()[split]
        if limit is not None and limit < len(ds):
            ds = ds.select(range(limit))
        return list(ds["text"])

    def count(self, split: str) -> int:
        return len(self.load()[split])

    def labels(self, split: str) -> np.ndarray:
        return self.load()[split].with_format("numpy")["label"][:]

    @property
    def id2label(self) -> dict[int, str]:
        return dict(enumerate(self.label_names))

    def tokenized(self, tokenizer: Any, max_length: int) -> DatasetDict:
        """Token ids without padding (batches are padded per batch); cached next to the saved data."""

        def encode(batch):
            return tokenizer(batch["text"], truncation=True, max_length=max_length)

        dsd = self.load()
        return dsd.map(encode, batched=True, remove_columns=["text"], desc="Tokenising").rename_column(
            "label", "labels"
        )


def unseen_texts(
    data: PreparedData, rows: Iterator[Row], column: str, limit: int | None, seed: int
) -> tuple[list[str], dict[str, int]]:
    """The texts of `rows` that none of the run's splits holds, each once (compared as the splits are deduped,
    stripped): a validation or test text here would leak into training and flatter the scores, a training text
    is already there with its label. Blank texts are skipped. At most `limit`, drawn at random with `seed`, in file
    order; with counts."""
    known = {split: {_text_key(t) for t in data.texts(split)} for split in SPLITS}
    counts = dict.fromkeys(["read", "empty", "duplicates", *(f"in_{s}" for s in SPLITS)], 0)
    seen: set[int] = set()
    texts = []
    for row in rows:
        counts["read"] += 1
        if isinstance(row.text, str) and not row.text.strip():
            counts["empty"] += 1  # a scraped corpus has blank cells; nothing to learn from them
            continue
        text = check_text(row, column)
        key = _text_key(text)
        split = next((s for s in SPLITS if key in known[s]), None)
        if key in seen:
            counts["duplicates"] += 1
        elif split is not None:
            counts[f"in_{split}"] += 1
        else:
            texts.append(text)
        seen.add(key)
    if limit is not None and limit < len(texts):
        keep = np.sort(np.random.default_rng(seed).choice(len(texts), size=limit, replace=False))
        texts = [texts[i] for i in keep]
    counts["used"] = len(texts)
    return texts, counts


def prepare_data(cfg: DataConfig, run_dir: Path) -> PreparedData:
    """Read and check the recipe's data once per run folder, streaming it into memory-mapped Arrow files (a corpus
    larger than memory fits); later calls reuse the saved copy."""
    from datasets import DatasetDict

    folder = run_dir / "data"
    meta_file = folder / "meta.json"
    meta = json.loads(meta_file.read_text()) if meta_file.is_file() else {}
    fingerprint, files = data_fingerprint(cfg, meta.get("files"))
    if meta.get("fingerprint") == fingerprint:
        if files != meta.get("files", {}):  # same bytes, touched files: remember the new stamps
            meta_file.write_text(json.dumps({**meta, "files": files}, indent=2))
        return PreparedData(folder, meta["label_names"], fingerprint)
    partial = run_dir / "data.partial"
    shutil.rmtree(partial, ignore_errors=True)
    (partial / "work").mkdir(parents=True)
    splits, names = _build(cfg, partial / "work")
    DatasetDict(splits).save_to_disk(str(partial / "dataset"))
    counts = {s: len(ds) for s, ds in splits.items()}
    del splits
    shutil.rmtree(partial / "work")
    meta = {"fingerprint": fingerprint, "label_names": names, "counts": counts, "files": files}
    (partial / "meta.json").write_text(json.dumps(meta, indent=2))
    shutil.rmtree(folder, ignore_errors=True)
    partial.rename(folder)
    return PreparedData(folder, names, fingerprint)
